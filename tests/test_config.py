"""Tests for cp_dtensor.config: defaults, TOML, command-line overrides, validation, help, TOML dump."""

import dataclasses
import textwrap
from pathlib import Path

import pytest

from cp_dtensor.config import (
    ConfigError,
    Data,
    JobConfig,
    Training,
    dump_toml,
    field_docs,
    format_help,
    load_config,
)


def _write(tmp_path: Path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def _sections(config: JobConfig) -> list[tuple[str, object]]:
    return [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]


def _error(argv: list[str]) -> str:
    """The ConfigError message load_config raises for argv (asserts it is one line)."""
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------------
# Defaults, TOML, command line
# ----------------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config([])
    assert config == JobConfig()
    assert config.job.dump_folder == "./outputs"
    assert config.model.name == "llama3" and config.model.attention_mask == "causal"
    assert config.training.seq_len == 2048 and config.training.global_batch_size == -1
    assert config.training.lr == 3e-4 and config.training.lr_schedule == "cosine"
    assert config.training.on_nonfinite == "stop" and config.training.deterministic is False
    assert config.parallelism.data_parallel_degree == -1
    assert config.parallelism.context_parallel_layout == "auto" and config.cp_layout == "zigzag"
    assert config.parallelism.context_parallel_comm == "p2p"
    assert config.activation_checkpoint.mode == "none"
    assert config.data.dataset == "synthetic_recall" and config.data.paths == []
    assert config.checkpoint.enable is False and config.checkpoint.load_step == -1
    assert config.metrics.log_file == "train_log.jsonl"
    assert config.timeouts.train_seconds == 100
    # Each default instance owns its list.
    assert JobConfig().data.paths is not JobConfig().data.paths


def test_toml_load(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [job]
        dump_folder = "/tmp/run1"
        [model]
        name = "torchtitan.llama3"
        attention_mask = "bidirectional"
        [training]
        steps = 50
        lr = 1       # an int is accepted for a float field
        deterministic = true
        [parallelism]
        context_parallel_degree = 4
        context_parallel_layout = "contiguous"
        [data]
        dataset = "text"
        paths = ["a.txt", "b.jsonl"]
        """,
    )
    config = load_config(["--config", path])
    assert config.job.dump_folder == "/tmp/run1"
    assert config.model.name == "torchtitan.llama3"
    assert config.model.attention_mask == "bidirectional"
    assert config.training.steps == 50
    assert config.training.lr == 1.0 and isinstance(config.training.lr, float)
    assert config.training.deterministic is True
    assert config.parallelism.context_parallel_degree == 4
    assert config.parallelism.context_parallel_layout == "contiguous"
    assert config.data.paths == ["a.txt", "b.jsonl"]
    # Keys the file does not name keep their defaults.
    assert config.training.seq_len == 2048 and config.checkpoint == JobConfig().checkpoint


def test_cli_override_with_space_and_equals() -> None:
    config = load_config(
        ["--training.steps", "17", "--training.lr=1e-3", "--job.description=a b", "--model.flavor", "tiny"]
    )
    assert config.training.steps == 17
    assert config.training.lr == 1e-3
    assert config.job.description == "a b"
    assert config.model.flavor == "tiny"


def test_cli_negative_number_is_a_value() -> None:
    config = load_config(["--parallelism.data_parallel_degree", "-1", "--training.seed", "-5"])
    assert config.parallelism.data_parallel_degree == -1
    assert config.training.seed == -5


def test_precedence_cli_over_toml_over_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "[training]\nsteps = 50\nwarmup_steps = 3\n")
    config = load_config(["--training.steps=20", "--config", path])  # order on the line does not matter
    assert config.training.steps == 20  # CLI beats TOML
    assert config.training.warmup_steps == 3  # TOML beats default
    assert config.training.seq_len == 2048  # default
    # The later of two CLI overrides wins.
    assert load_config(["--training.steps", "15", "--training.steps", "16"]).training.steps == 16


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--checkpoint.enable"], True),  # bare flag at the end
        (["--checkpoint.enable", "--training.steps", "50"], True),  # bare flag before another option
        (["--checkpoint.enable", "true"], True),
        (["--checkpoint.enable", "TRUE"], True),
        (["--checkpoint.enable=1"], True),
        (["--checkpoint.enable", "yes"], True),
        (["--checkpoint.enable", "false"], False),
        (["--checkpoint.enable=0"], False),
        (["--checkpoint.enable", "No"], False),
    ],
)
def test_bool_flags(argv: list[str], expected: bool) -> None:
    assert load_config(argv).checkpoint.enable is expected


def test_bool_flag_false_on_cli_beats_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "[checkpoint]\nenable = true\n")
    assert load_config(["--config", path]).checkpoint.enable is True
    assert load_config(["--config", path, "--checkpoint.enable=false"]).checkpoint.enable is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.txt", ["a.txt"]),
        ("a.txt,b.jsonl", ["a.txt", "b.jsonl"]),
        (" a.txt , b.jsonl ,", ["a.txt", "b.jsonl"]),
        ("", []),
    ],
)
def test_list_parsing(text: str, expected: list[str]) -> None:
    assert load_config([f"--data.paths={text}"]).data.paths == expected


def test_list_from_cli_replaces_toml_list(tmp_path: Path) -> None:
    path = _write(tmp_path, '[data]\ndataset = "text"\npaths = ["x.txt", "y.txt"]\n')
    config = load_config(["--config", path, "--data.paths", "z.jsonl"])
    assert config.data.paths == ["z.jsonl"]


# ----------------------------------------------------------------------------------------------------------
# Errors: each names the key (and the fix)
# ----------------------------------------------------------------------------------------------------------


def test_unknown_section_toml(tmp_path: Path) -> None:
    message = _error(["--config", _write(tmp_path, "[trainin]\nsteps = 5\n")])
    assert "trainin" in message and "did you mean training" in message


def test_top_level_key_toml_points_to_its_section(tmp_path: Path) -> None:
    message = _error(["--config", _write(tmp_path, "steps = 5\n")])
    assert "'steps'" in message and "training.steps" in message


def test_unknown_section_cli() -> None:
    message = _error(["--trainig.steps", "5"])
    assert "trainig" in message and "--training" in message


def test_option_without_section_cli() -> None:
    message = _error(["--steps", "5"])
    assert "--steps" in message and "--training.steps" in message


def test_unknown_key_toml(tmp_path: Path) -> None:
    message = _error(["--config", _write(tmp_path, "[training]\nstepz = 5\n")])
    assert "training.stepz" in message and "did you mean training.steps?" in message


def test_unknown_key_cli() -> None:
    message = _error(["--training.lrr", "0.1"])
    assert "--training.lrr" in message and "did you mean --training.lr?" in message


def test_unknown_key_in_wrong_section_suggests_owner() -> None:
    message = _error(["--model.seq_len", "128"])
    assert "--model.seq_len" in message and "--training.seq_len" in message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    message = _error(["--config", _write(tmp_path, 'training = "fast"\n')])
    assert "training" in message and "[training]" in message


def test_wrong_type_cli_message() -> None:
    assert _error(["--training.steps", "abc"]) == "training.steps: expected int, got 'abc' (str)"


@pytest.mark.parametrize(
    ("toml", "key", "detail"),
    [
        ('[training]\nsteps = "10"\n', "training.steps", "expected int, got '10' (str)"),
        ("[training]\nsteps = true\n", "training.steps", "expected int, got True (bool)"),  # bool is not int
        ("[training]\nsteps = 10.0\n", "training.steps", "expected int, got 10.0 (float)"),
        ("[training]\nlr = true\n", "training.lr", "expected float, got True (bool)"),
        ('[training]\nlr = "0.1"\n', "training.lr", "expected float"),
        ("[training]\nlr = inf\n", "training.lr", "finite"),
        ('[checkpoint]\nenable = "yes"\n', "checkpoint.enable", "expected bool"),
        ("[checkpoint]\nenable = 1\n", "checkpoint.enable", "expected bool"),
        ("[model]\nflavor = 8\n", "model.flavor", 'quote it in TOML: flavor = "8"'),
        ('[data]\npaths = "a.txt"\n', "data.paths", 'paths = ["a.txt"]'),
        ("[data]\npaths = [1, 2]\n", "data.paths", "expected list[str]"),
    ],
)
def test_wrong_type_toml(tmp_path: Path, toml: str, key: str, detail: str) -> None:
    message = _error(["--config", _write(tmp_path, toml)])
    assert message.startswith(f"{key}: ") and detail in message


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--training.lr", "fast"], "training.lr"),
        (["--training.lr", "nan"], "training.lr"),
        (["--training.steps", "1.5"], "training.steps"),
        (["--training.steps", "true"], "training.steps"),
        (["--checkpoint.enable", "maybe"], "checkpoint.enable"),
    ],
)
def test_wrong_type_cli(argv: list[str], key: str) -> None:
    assert _error(argv).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("option", "choices"),
    [
        ("--model.attention_mask=sliding", ['"causal"', '"bidirectional"']),
        ("--model.name=gpt2", ['"llama3"', '"torchtitan.llama3"']),
        ("--training.lr_schedule=step", ['"cosine"', '"linear"', '"constant"']),
        ("--training.mixed_precision_param=float16", ['"float32"', '"bfloat16"']),
        ("--training.on_nonfinite=ignore", ['"stop"', '"skip"']),
        ("--parallelism.context_parallel_layout=striped", ['"zigzag"', '"contiguous"']),
        ("--parallelism.pipeline_parallel_schedule=zb", ['"1F1B"', '"GPipe"', '"Interleaved1F1B"']),
        ("--activation_checkpoint.mode=some", ['"none"', '"selective"', '"full"']),
        ("--data.dataset=c4", ['"synthetic_recall"', '"text"']),
    ],
)
def test_literal_choices(option: str, choices: list[str]) -> None:
    message = _error([option])
    key, value = option[2:].split("=")
    assert message.startswith(f"{key}: {value!r} is not one of")
    for choice in choices:
        assert choice in message


def test_comm_choices_come_from_the_strategy_registry() -> None:
    message = _error(["--parallelism.context_parallel_comm=a2a"])
    assert message.startswith("parallelism.context_parallel_comm: Unknown CP comm mode 'a2a'")
    for name in ("p2p", "allgather", "alltoall", "hybrid", "auto"):
        assert f"'{name}'" in message


def test_renamed_keys_say_their_new_name() -> None:
    assert _error(["--parallelism.context_parallel_a2a_degree=2"]) == (
        "config key --parallelism.context_parallel_a2a_degree on the command line was renamed to "
        "--parallelism.context_parallel_a2a_size"
    )
    assert "renamed to 'timeouts'" in _error(["--comm.train_timeout_seconds=5"])


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("training.steps", "0", ">= 1"),
        ("training.seq_len", "0", ">= 1"),
        ("training.local_batch_size", "0", ">= 1"),
        ("training.global_batch_size", "0", ">= 1 or -1"),
        ("training.global_batch_size", "-2", ">= 1 or -1"),
        ("training.lr", "0", "> 0"),
        ("training.lr", "-1e-4", "> 0"),
        ("training.warmup_steps", "-1", ">= 0"),
        ("training.min_lr_ratio", "-0.1", ">= 0 and <= 1"),
        ("training.min_lr_ratio", "1.5", ">= 0 and <= 1"),
        ("training.max_norm", "-1", ">= 0"),
        ("training.weight_decay", "-0.1", ">= 0"),
        ("training.beta1", "1", ">= 0 and < 1"),
        ("training.beta2", "-0.5", ">= 0 and < 1"),
        ("parallelism.data_parallel_degree", "0", ">= 1 or -1"),
        ("parallelism.data_parallel_degree", "-2", ">= 1 or -1"),
        ("parallelism.context_parallel_degree", "0", ">= 1"),
        ("parallelism.context_parallel_degree", "-1", ">= 1"),
        ("parallelism.tensor_parallel_degree", "0", ">= 1"),
        ("parallelism.pipeline_parallel_degree", "0", ">= 1"),
        ("parallelism.pipeline_parallel_microbatches", "0", ">= 1 or -1"),
        ("checkpoint.interval", "0", ">= 1"),
        ("checkpoint.keep_latest_k", "-1", ">= 0"),
        ("checkpoint.load_step", "-3", ">= 0 or -1"),
        ("metrics.log_freq", "0", ">= 1"),
        ("timeouts.init_seconds", "0", ">= 1"),
        ("timeouts.train_seconds", "0", ">= 1"),
    ],
)
def test_out_of_range(key: str, value: str, bound: str) -> None:
    message = _error([f"--{key}={value}"])
    assert message.startswith(f"{key}: must be {bound}, got ")


@pytest.mark.parametrize(
    ("argv", "divisor", "suggestion"),
    [
        # tp 2 x cp 2 x 2 (zigzag) = 8
        (
            ["--parallelism.tensor_parallel_degree=2", "--parallelism.context_parallel_degree=2"],
            8,
            "use 96 or 104",
        ),
        # contiguous: tp 2 x cp 3 = 6
        (
            [
                "--parallelism.tensor_parallel_degree=2",
                "--parallelism.context_parallel_degree=3",
                "--parallelism.context_parallel_layout=contiguous",
            ],
            6,
            "use 96 or 102",
        ),
        # cp = 1: no zigzag factor, tp 3 alone
        (["--parallelism.tensor_parallel_degree=3"], 3, "use 99 or 102"),
    ],
)
def test_seq_len_multiple(argv: list[str], divisor: int, suggestion: str) -> None:
    message = _error([*argv, "--training.seq_len=100"])
    assert message.startswith("training.seq_len=100 ")
    assert f"must be a multiple of {divisor} " in message and suggestion in message


def test_seq_len_multiple_suggests_only_positive_lengths() -> None:
    message = _error(["--parallelism.context_parallel_degree=4", "--training.seq_len=3"])
    assert "multiple of 8 " in message and "zigzag" in message and message.endswith("use 8")


def test_seq_len_valid_combinations() -> None:
    cp = "--parallelism.context_parallel_degree=2"
    assert load_config([cp, "--training.seq_len=4"]).training.seq_len == 4
    contiguous = "--parallelism.context_parallel_layout=contiguous"
    assert load_config([cp, contiguous, "--training.seq_len=6"]).training.seq_len == 6
    # Zigzag with cp = 1 adds no factor of 2.
    assert load_config(["--training.seq_len=7"]).training.seq_len == 7


def test_text_dataset_needs_paths() -> None:
    message = _error(["--data.dataset", "text"])
    assert message.startswith("data.paths:") and "--data.paths" in message
    assert load_config(["--data.dataset", "text", "--data.paths", "a.txt"]).data.paths == ["a.txt"]


def test_warmup_longer_than_the_run_is_allowed() -> None:
    # A short debug run (--training.steps 2) must not trip over the config's warmup.
    assert load_config(["--training.steps=5", "--training.warmup_steps=6"]).training.warmup_steps == 6


def test_global_batch_size_multiple() -> None:
    message = _error(["--training.local_batch_size=4", "--training.global_batch_size=6"])
    assert (
        message.startswith("training.global_batch_size=6 must be a multiple of 4") and "use 4 or 8" in message
    )
    dp = "--parallelism.data_parallel_degree=2"
    message = _error([dp, "--training.local_batch_size=2", "--training.global_batch_size=6"])
    assert "multiple of 4" in message and "data_parallel_degree=2" in message
    config = load_config([dp, "--training.local_batch_size=2", "--training.global_batch_size=8"])
    assert config.training.global_batch_size == 8


def test_a2a_degree_only_with_hybrid_and_a_proper_divisor_of_cp() -> None:
    cp4 = "--parallelism.context_parallel_degree=4"
    message = _error([cp4, "--parallelism.context_parallel_a2a_size=2"])
    assert (
        message.startswith("parallelism.context_parallel_a2a_size=2 applies only to") and '"p2p"' in message
    )
    hybrid = "--parallelism.context_parallel_comm=hybrid"
    for bad in ("3", "4", "1"):
        message = _error([cp4, hybrid, f"--parallelism.context_parallel_a2a_size={bad}"])
        assert "must divide context_parallel_degree=4" in message and "use one of [2]" in message
    message = _error(
        ["--parallelism.context_parallel_degree=2", hybrid, "--parallelism.context_parallel_a2a_size=2"]
    )
    assert "none exists" in message and "alltoall" in message
    ok = load_config([cp4, hybrid, "--parallelism.context_parallel_a2a_size=2"])
    assert ok.parallelism.context_parallel_a2a_size == 2
    assert load_config([cp4, hybrid]).parallelism.context_parallel_a2a_size == 0  # the cost model picks


def test_pipeline_microbatches_divide_local_batch() -> None:
    pp = "--parallelism.pipeline_parallel_degree=2"
    message = _error([pp, "--training.local_batch_size=3"])
    assert message.startswith("training.local_batch_size=3") and "pipeline_parallel_microbatches" in message
    assert load_config([pp, "--training.local_batch_size=4"]).training.local_batch_size == 4
    message = _error([pp, "--parallelism.pipeline_parallel_microbatches=3", "--training.local_batch_size=4"])
    assert "3 pipeline microbatches" in message


@pytest.mark.parametrize("option", ["0", "-1", "op", "", "x2"])
def test_selective_ac_option(option: str) -> None:
    message = _error([f"--activation_checkpoint.selective_ac_option={option}"])
    assert message.startswith("activation_checkpoint.selective_ac_option:")


@pytest.mark.parametrize(
    "argv",
    [
        ["--training.steps"],
        ["--training.steps", "--training.lr", "0.1"],
        ["--data.paths"],
    ],
)
def test_missing_value(argv: list[str]) -> None:
    message = _error(argv)
    assert message.startswith(f"{argv[0]} needs a value") and f"{argv[0]}=VALUE" in message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    message = _error(["--config", missing])
    assert message.startswith("--config:") and "nope.toml" in message and "not found" in message
    assert _error(["--config"]).startswith("--config needs a path")


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    message = _error(["--config", _write(tmp_path, "[training]\nsteps = = 5\n")])
    assert message.startswith("--config:") and "not valid TOML" in message and "line 2" in message


def test_positional_argument_is_rejected() -> None:
    message = _error(["train.toml"])
    assert "'train.toml'" in message and "--config PATH" in message


def test_cli_is_resolved_before_reading_the_file() -> None:
    # A typo in an option fails first, even when the config file is missing too.
    assert "training.stepz" in _error(["--config", "/nonexistent.toml", "--training.stepz", "1"])


def test_validate_checks_programmatic_values() -> None:
    config = JobConfig()
    config.validate()
    config.training.steps = 0
    with pytest.raises(ConfigError, match=r"^training\.steps: must be >= 1"):
        config.validate()
    config = JobConfig(training=Training(lr="0.1"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^training\.lr: expected float"):
        config.validate()
    config = JobConfig(data=Training())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^data: expected a Data section"):
        config.validate()


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------------------------------------
# Help, docstrings, to_dict, dump -> reload
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_option_with_default(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(["--training.steps", "5", flag])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == format_help()
    lines = out.splitlines()
    defaults = {
        "--training.lr": "default 0.0003",
        "--job.dump_folder": 'default "./outputs"',
        "--data.paths": "default []",
        "--checkpoint.enable": "default false",
        "--model.attention_mask": 'default "causal"',
    }
    default_texts = _default_texts()
    for name, section in _sections(JobConfig()):
        assert any(line.startswith(f"[{name}]") for line in lines)
        docs = field_docs(type(section))
        for f in dataclasses.fields(section):
            option = f"--{name}.{f.name}"
            (line,) = [line for line in lines if line.split()[:1] == [option]]
            assert f"default {default_texts[f'{name}.{f.name}']}" in line
            assert " ".join(docs[f.name].split()) in line
            if option in defaults:
                assert defaults[option] in line


def _default_texts() -> dict[str, str]:
    """``{section.key: default as TOML text}`` read from the dumped default config."""
    texts, section = {}, ""
    for line in dump_toml(JobConfig()).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            key, value = line.split(" = ", 1)
            texts[f"{section}.{key}"] = value
    return texts


def test_help_groups_options_by_section() -> None:
    text = format_help()
    positions = [text.index(f"\n[{name}]") for name, _ in _sections(JobConfig())]
    assert positions == sorted(positions)
    assert text.index("--training.steps") > text.index("\n[training]") > text.index("--model.flavor")


def test_every_field_has_a_docstring() -> None:
    classes = [JobConfig, *(type(section) for _, section in _sections(JobConfig()))]
    for cls in classes:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"
    assert "0 disables" in field_docs(Training)["max_norm"]
    assert field_docs(Data) is field_docs(Data)  # computed once


def test_to_dict() -> None:
    config = load_config(["--training.steps=30", "--data.paths=a,b"])
    data = config.to_dict()
    assert list(data) == [name for name, _ in _sections(config)]
    assert data["training"]["steps"] == 30 and data["data"]["paths"] == ["a", "b"]
    data["data"]["paths"].append("c")  # a copy
    assert config.data.paths == ["a", "b"]
    assert JobConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"training\.stepz.*did you mean training\.steps\?"):
        JobConfig.from_dict({"training": {"stepz": 3}})


def test_dump_reload_round_trip(tmp_path: Path) -> None:
    argv = [
        "--job.description",
        'tricky "quoted" \\ back\tslash\nnewline \x7f ünïcode 😀',
        "--training.lr=1e-05",
        "--training.min_lr_ratio=0",
        "--training.max_norm=0.3333333333333333",
        "--training.seed=-3",
        "--training.seq_len=96",
        "--training.deterministic",
        "--parallelism.context_parallel_degree=4",
        "--parallelism.context_parallel_layout=contiguous",
        "--parallelism.context_parallel_comm=allgather",
        "--data.dataset=text",
        "--data.paths=a b.txt,c.jsonl",
        "--checkpoint.enable=yes",
        "--activation_checkpoint.mode=selective",
    ]
    config = load_config(argv)
    text = dump_toml(config)
    reloaded = load_config(["--config", _write(tmp_path, text, name="dumped.toml")])
    assert reloaded == config
    assert dump_toml(reloaded) == text
    # The defaults round-trip too.
    assert load_config(["--config", _write(tmp_path, dump_toml(JobConfig()), name="d.toml")]) == JobConfig()


def test_a_window_layer_pattern_without_a_window_is_refused() -> None:
    """Issue 25 item 10: sliding_window_layers = "alternate" without sliding_window was accepted and ignored."""
    message = _error(["--model.sliding_window_layers", "alternate"])
    assert (
        message.startswith('model.sliding_window_layers = "alternate" needs a window')
        and "sliding_window" in message
    )
    assert load_config(["--model.sliding_window_layers", "alternate", "--model.sliding_window", "64"])


def test_reset_positions_is_documented_as_working_with_documents_and_windows() -> None:
    """Issue 25 item 10: the reference said "Not yet with document_causal or a sliding window", but both train
    with cp1 = cp2 (test_trainer.py::test_reset_positions_with_documents_and_a_window_train_equal_at_cp1_and_cp2)."""
    doc = field_docs(Data)["reset_positions"]
    assert "not yet" not in doc.lower() and "document_causal" in doc and "sliding windows" in doc
