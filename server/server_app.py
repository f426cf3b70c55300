"""fedoppu ServerApp: coordinates the shared base adapter and the evaluation of every method."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import Federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    Federation(grid, config).run(config.method_list)
