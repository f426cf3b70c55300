"""The node's own privacy policy: its file, what it refuses, its ledger across runs, its pseudonyms."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from client.policy import (
    SIMULATION_POLICY,
    NodePolicy,
    PolicyRefusal,
    PrivacyLedger,
    load_policy,
    node_policy,
    node_secret,
    pseudonym,
    release_multiplier,
)
from common.io import DataError

STRICT = """
allowed-privacy = ["local-dp", "secagg+dp"]
min-noise-multiplier = 1.0
max-clipping-norm = 0.2
max-epsilon = 20
"""


def _policy(tmp_path, text=STRICT):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return load_policy(path)


def test_a_policy_file_sets_the_minimum_the_node_accepts(tmp_path):
    policy = _policy(tmp_path)
    assert policy.allowed_privacy == ("local-dp", "secagg+dp") and policy.max_epsilon == 20.0
    assert policy.user_ids == "pseudonym" and policy.min_group_size == 2  # the deployed defaults
    policy.admit("local-dp", 1.0, 0.15)
    for request, key in [
        (("none", 0.0, 6.0), "allowed-privacy"),
        (("central-dp", 2.0, 0.1), "allowed-privacy"),
        (("local-dp", 0.5, 0.15), "min-noise-multiplier"),
        (("secagg+dp", 1.0, 6.0), "max-clipping-norm"),
    ]:
        with pytest.raises(PolicyRefusal) as err:
            policy.admit(*request)
        assert err.value.key == key and f"'{key}'" in str(err.value)
    unnoised = NodePolicy(min_noise_multiplier=0.5)
    with pytest.raises(PolicyRefusal, match="min-noise-multiplier"):
        unnoised.admit("secagg", 5.0, 6.0)  # SecAgg+ alone adds no noise, whatever the run config says


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-epsilon = -1", "max-epsilon = -1.0; expected >= 0"),
        ('allowed-privacy = ["dp"]', "allowed-privacy"),
        ("min-group-size = 0", "min-group-size = 0; expected an integer >= 1"),
        ('user-ids = "email"', "user-ids"),
        ("min-group-size = 2.5", "expected int"),
        ("trusted-apps = ['abc']", "sha256 hex digests"),
        ("minimum-noise = 1", "unknown policy key(s) ['minimum-noise']"),
        ("max-epsilon = ", "cannot read"),
    ],
)
def test_a_bad_policy_file_names_the_key(tmp_path, text, message):
    with pytest.raises(DataError, match=r"policy\.toml") as err:
        _policy(tmp_path, text)
    assert message in str(err.value)


def test_deployed_simulated_and_configured_nodes_get_their_policy(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDOPPU_NODE_POLICY", raising=False)
    assert node_policy({"partition-id": 0}) == SIMULATION_POLICY
    assert node_policy({"data-path": "/data"}) == NodePolicy()
    (tmp_path / "policy.toml").write_text(STRICT)
    monkeypatch.setenv("FEDOPPU_NODE_POLICY", str(tmp_path / "policy.toml"))
    assert node_policy({"partition-id": 0}).max_epsilon == 20.0
    assert node_policy({"data-path": "/data"}) == NodePolicy()  # a deployed node reads its node config only
    assert node_policy({"data-path": "/d", "policy-path": str(tmp_path / "policy.toml")}).max_epsilon == 20.0


def test_the_ledger_refuses_repeated_rounds_and_keeps_the_budget_across_runs(tmp_path):
    policy = NodePolicy(max_epsilon=8.0)
    ledger = PrivacyLedger(tmp_path)
    ledger.admit(policy, run_id=1, server_round=1, setting="central-dp", multiplier=1.0)
    with pytest.raises(PolicyRefusal, match="refuse-repeated-rounds"):
        ledger.admit(policy, run_id=1, server_round=1, setting="central-dp", multiplier=1.0)
    # A new run (or a server that renames its runs) draws on the same budget: 4.73, 7.08, then 9.01 > 8.
    PrivacyLedger(tmp_path).admit(policy, run_id=2, server_round=1, setting="central-dp", multiplier=1.0)
    with pytest.raises(PolicyRefusal, match=r"max-epsilon.*9\.010"):
        PrivacyLedger(tmp_path).admit(policy, run_id=3, server_round=1, setting="central-dp", multiplier=1.0)
    assert len(ledger.releases()) == 2
    reference = RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(1.0), 2)
    assert ledger.spent(1e-5) == pytest.approx(reference.get_epsilon(1e-5))
    with pytest.raises(PolicyRefusal, match="claims no epsilon"):
        ledger.admit(policy, run_id=4, server_round=1, setting="none", multiplier=None)
    ledger.admit(NodePolicy(), run_id=4, server_round=1, setting="none", multiplier=None)
    assert ledger.spent(1e-5) == math.inf  # once anything left without DP, no epsilon holds


def test_each_setting_costs_the_node_what_the_server_accounts():
    assert release_multiplier("none", 1.0, 6.0, 100) is None
    assert release_multiplier("secagg", 1.0, 6.0, 100) is None
    assert release_multiplier("client-dp", 1.5, 6.0, 100) == 1.5
    assert release_multiplier("local-dp", 1.5, 6.0, 100) == 0.75  # the server sees the release itself
    # adaptive-dp's two releases at any number of clients n: count noise max(n/20, z) >= z
    for n in (2, 8, 100, 10_000):
        count = max(n / 20, 1.0)
        update = (1.0 - (2 * count) ** -2) ** -0.5
        assert (update**-2 + count**-2) ** -0.5 >= release_multiplier("adaptive-dp", 1.0, 6.0, 100) - 1e-12
    assert release_multiplier("secagg+dp", 1.0, 6.0, 460_800) == pytest.approx(
        1.0 * 6 / (6 + 0.0025895), rel=1e-4
    )


def test_pseudonyms_are_stable_within_a_scope_and_unlinkable_across(tmp_path):
    secret = node_secret(tmp_path)
    assert node_secret(tmp_path) == secret and (tmp_path / "node-secret").stat().st_mode & 0o077 == 0
    first = pseudonym(secret, "run-a", "alice@example.org")
    assert first == pseudonym(secret, "run-a", "alice@example.org") and first.startswith("p-")
    assert (
        len({first, pseudonym(secret, "run-b", "alice@example.org"), pseudonym(secret, "run-a", "bob")}) == 3
    )
    assert pseudonym(node_secret(tmp_path / "other-node"), "run-a", "alice@example.org") != first
    assert "alice" not in first
