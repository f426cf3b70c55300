import pytest

from common.config import ConfigError, RunConfig, default_config_values, load_run_config, parse_override


def test_defaults_come_from_pyproject_and_validate():
    config = load_run_config()
    assert config.to_flower() == default_config_values()
    assert config.model == "smollm2-135m"
    assert config.method_list == ["zero-shot", "shared", "oppu"]


def test_overrides_parse_toml_values_and_bare_words():
    assert parse_override("num-rounds=5") == ("num-rounds", 5)
    assert parse_override("learning-rate=1e-3") == ("learning-rate", 0.001)
    assert parse_override("strategy=fedprox") == ("strategy", "fedprox")
    config = load_run_config(overrides=["num-rounds=5", "strategy=fedprox", "lora-dropout=0"])
    assert (config.num_rounds, config.strategy, config.lora_dropout) == (5, "fedprox", 0.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num-round=2", "unknown key(s) ['num-round']"),
        ("num-rounds=two", "num-rounds = 'two' (str); expected int"),
        ("strategy=fedsgd", "strategy = 'fedsgd'; expected one of"),
        ("methods=oppu,magic", "methods has 'magic'"),
        ("fraction-train=1.5", "fraction-train = 1.5; expected 0 < value <= 1"),
        ("batch-size=0", "batch-size = 0; expected an integer >= 1"),
        ("eval-every-round=1", "eval-every-round = 1 (int); expected bool"),
        ("min-train-fraction=0", "min-train-fraction = 0.0; expected 0 < value <= 1"),
        ("train-timeout=-1", "train-timeout = -1.0; expected seconds >= 0 (0 = no limit)"),
        ("min-nodes=0", "min-nodes = 0; expected an integer >= 1"),
        ("train-retries=-1", "train-retries = -1; expected an integer >= 0"),
        ("max-update-norm=-1", "max-update-norm = -1.0; expected >= 0 (0 = no bound)"),
        ("autocast-bf16=fast", "autocast-bf16 = 'fast'; expected true, false or 'auto'"),
        ("autocast-bf16=1", "autocast-bf16 = 1 (int); expected bool or str"),
        ("adapter-layers=0", "adapter-layers = 0; expected 'all' or a number of top decoder layers >= 1"),
        ("adapter-layers=top", "adapter-layers = 'top'; expected 'all' or a number"),
        ("adapter-layers=2.5", "adapter-layers = 2.5 (float); expected int or str"),
        ("personal-gate=always", "personal-gate = 'always'; expected one of ('none', 'choice', 'mix')"),
        ("personal-holdout=1", "personal-holdout = 1.0; expected 0 < value < 1"),
        ("personal-gate-evals=0", "personal-gate-evals = 0; expected an integer >= 1"),
        ("personal-gate-weights=0,0.5", "personal-gate-weights = '0,0.5'; expected a comma list"),
        ("personal-gate-weights=0,x,1", "personal-gate-weights = '0,x,1'; expected a comma list"),
        (
            "personal-gate-weights=1,2",
            "personal-gate-weights = '1,2'; expected a comma list of numbers in 0..1",
        ),
        ("hidden-cache-mb=-1", "hidden-cache-mb = -1; expected >= 0"),
        ("benchmark-shifted-queries=-1", "benchmark-shifted-queries = -1; expected >= 0 (0 = off)"),
        ("shared-lora-r=-1", "shared-lora-r = -1; expected an integer >= 1, or 0 (= lora-r)"),
        ("shared-lora-alpha=-2", "shared-lora-alpha = -2; expected an integer >= 1, or 0 (= lora-alpha)"),
        ("shared-adapter-layers=-1", "shared-adapter-layers = -1; expected 0 (= adapter-layers), 'all' or"),
        ("shared-adapter-layers=top", "shared-adapter-layers = 'top'; expected 0 (= adapter-layers)"),
        ("target-modules=,", "target-modules = ','; expected a comma list of names"),
    ],
)
def test_bad_overrides_name_the_key_and_the_expectation(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_run_config(overrides=[override])
    assert message in str(err.value)


@pytest.mark.parametrize("other", ["task=rating", "data=../shared/data/commit-subjects-sympy"])
def test_shifted_queries_need_the_builtin_tagging_benchmark(other):
    assert load_run_config(overrides=["benchmark-shifted-queries=2"]).benchmark_shifted_queries == 2
    with pytest.raises(ConfigError) as err:
        load_run_config(overrides=["benchmark-shifted-queries=2", other])
    assert (
        "benchmark-shifted-queries = 2 needs the built-in benchmark (data = 'builtin') with task 'tagging'"
        in str(err.value)
    )
    assert other.split("=")[1] in str(err.value)


def test_precision_and_adapter_layers_take_a_word_or_a_value():
    config = load_run_config(overrides=["autocast-bf16=false", "adapter-layers=4"])
    assert (config.autocast_bf16, config.adapter_layers) == (False, 4)
    config = load_run_config(overrides=['autocast-bf16="auto"', "adapter-layers=all"])
    assert (config.autocast_bf16, config.adapter_layers) == ("auto", "all")


def test_rag_methods_need_a_positive_k():
    with pytest.raises(ConfigError, match="rag-k = 0"):
        load_run_config(overrides=["rag-k=0", "methods=rag"])
    assert load_run_config(overrides=["rag-k=0", "methods=oppu"]).rag_k == 0


def test_config_file_overrides_and_errors(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('num-rounds = 7\ntask = "rating"\n')
    assert load_run_config(good).num_rounds == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 7\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: cannot read config file"):
        load_run_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("rounds = 7\n")
    with pytest.raises(ConfigError, match=r"unknown.toml: unknown key\(s\) \['rounds'\]"):
        load_run_config(unknown)


def test_from_mapping_reports_missing_keys():
    values = default_config_values()
    del values["seed"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['seed'\]"):
        RunConfig.from_mapping(values)


def test_a_zero_timeout_means_no_limit():
    config = load_run_config(overrides=["train-timeout=0", "evaluate-timeout=90"])
    assert config.timeout("train") is None and config.timeout("evaluate") == 90.0


def test_the_gate_tries_its_weights_only_when_it_mixes():
    assert load_run_config(overrides=["personal-gate=mix"]).gate_weights == (1.0, 0.5, 0.0)
    assert load_run_config(overrides=["personal-gate=choice"]).gate_weights == (1.0,)
    assert load_run_config(overrides=["personal-gate=none"]).gate_setting == "none"


@pytest.mark.parametrize("peft_type", ["dora", "ia3"])
def test_what_scales_or_freezes_lora_matrices_is_refused_for_other_peft_types(peft_type):
    """personal-gate = "mix" scales the shared adapter's B matrices, FFA-LoRA freezes its A matrices:
    DoRA's magnitudes and IA3's vectors have neither."""
    with pytest.raises(
        ConfigError, match=f"peft-type = '{peft_type}' needs personal-gate = 'choice' or 'none'"
    ):
        load_run_config(overrides=["personal-gate=mix", f"peft-type={peft_type}"])
    with pytest.raises(
        ConfigError, match=f"shared-ffa-lora = true needs peft-type = 'lora', not '{peft_type}'"
    ):
        load_run_config(overrides=["shared-ffa-lora=true", f"peft-type={peft_type}"])
    assert (
        load_run_config(overrides=["personal-gate=choice", f"peft-type={peft_type}"]).peft_type == peft_type
    )


def test_the_shared_adapters_unset_keys_are_the_personal_adapters():
    config = load_run_config(overrides=["lora-r=4", "lora-alpha=16", "adapter-layers=all"])
    assert config.shared_layout == (4, 16, config.target_module_list, "all")
    small = load_run_config(
        overrides=["shared-lora-r=2", 'shared-target-modules="q_proj, v_proj"', "shared-adapter-layers=2"]
    )
    assert small.shared_layout == (2, small.lora_alpha, ["q_proj", "v_proj"], 2)
