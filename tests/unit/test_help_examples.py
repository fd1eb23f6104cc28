"""Every example command in every entry point's `--help` names things that exist: the module it
runs, the options that module takes, the shipped files (configs/, cluster/) and the config keys
(`--section.key=value`). Running each is too slow (data, a cluster, the hub); checking the names
is what catches a rename. Also: the config tool reads fine-tuning configs."""

import contextlib
import dataclasses
import importlib
import io
import re
import shlex
import typing

import pytest
import yaml

from pixelbert_dist import cli
from pixelbert_dist.config import FinetuneConfig, help as config_help
from tests.launch import REPO

# every `python -m` module: those with a __main__ block, and the config package's __main__.py
ENTRY_POINTS = sorted(
    [".".join(p.relative_to(REPO).with_suffix("").parts)
     for folder in ("pixelbert_dist", "data_pipeline") for p in (REPO / folder).rglob("*.py")
     if 'if __name__ == "__main__"' in p.read_text()] + ["pixelbert_dist.config"])


def help_text(module: str) -> str:
    """What `python -m MODULE --help` prints, in this process (a subprocess each costs seconds)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        if module in ("pixelbert_dist.pretrain", "pixelbert_dist.finetune"):
            job = module.rsplit(".", 1)[1]
            cli.parse_args(["--help"], job, importlib.import_module(module).__doc__)
        elif module == "pixelbert_dist.config":
            config_help.main(["--help"])
        else:
            importlib.import_module(module).main(["--help"])
    return out.getvalue()


def commands(text: str) -> list[list[str]]:
    """The example command lines of a help text (continuation lines joined), as words."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()
        if re.match(r"(\.venv/bin/)?(python|torchrun|deepspeed|ray job submit)\b", line) and " -m" in line \
                or "--module " in line:
            found.append(shlex.split(line.replace("{", "").replace("}", "")))
    return found


def config_keys() -> set[str]:
    hints = typing.get_type_hints(FinetuneConfig)
    return {f"{section.name}.{f.name}" for section in dataclasses.fields(FinetuneConfig)
            for f in dataclasses.fields(hints[section.name])}


def test_every_entry_point_is_found():
    assert {"pixelbert_dist.pretrain", "pixelbert_dist.finetune", "pixelbert_dist.export", "pixelbert_dist.tokenizer",
            "data_pipeline.shard", "data_pipeline.index", "pixelbert_dist.config"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_example_in_the_help_names_what_exists(module):
    text = help_text(module)
    assert text.startswith("usage:") or module == "pixelbert_dist.config", text[:200]
    problems = problems_in(text)
    assert not problems, "\n".join(problems)


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_readme_and_docs_names_what_exists(page):
    """The same checks on every command block of the README and docs/ (running them needs data,
    a cluster or a GPU; `make demo` and `make test` run for real in CI)."""
    text = page.read_text()
    assert commands(text) or page.name in NO_COMMANDS, f"{page.name}: no command found (the extraction broke?)"
    problems = problems_in(text)
    assert not problems, "\n".join(problems)


NO_COMMANDS = {"layout.md", "faults.md", "tracking.md", "checkpoints.md", "benchmarks.md",
               "python-api.md"}


def problems_in(text: str) -> list[str]:
    """What an example names that does not exist: config keys, entry points, their options, shipped files."""
    keys, sections = config_keys(), {k.split(".")[0] for k in config_keys()}
    problems = []
    # config keys anywhere in the text (prose too: "train with `--data.train_manifest=OUT`")
    for key in re.findall(r"--([a-z_]+\.[a-z_]+)\b", text):
        if key.split(".")[0] in sections and key not in keys:
            problems.append(f"config key --{key} does not exist")
    for words in commands(text):
        where = " ".join(words)
        target = words[words.index("-m") + 1] if "-m" in words else words[words.index("--module") + 1]
        if target not in ENTRY_POINTS:
            problems.append(f"{where}: module {target} is not an entry point")
            continue
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text(target))) | {"--help"}
        for word in words[words.index(target) + 1:]:
            flag = word.split("=")[0]
            if flag.startswith("--") and "." not in flag and flag not in options:
                problems.append(f"{where}: {target} has no option {flag}")
        for word in words:
            if re.match(r"(configs|cluster)/", word) and "*" not in word and not (REPO / word).exists():
                problems.append(f"{where}: {word} is not in the repository")
    return problems


def test_the_examples_are_extracted():
    """The checks above look at real commands: a help text whose examples stop matching fails here."""
    found = {module: commands(help_text(module)) for module in ENTRY_POINTS}
    for module in ("pixelbert_dist.pretrain", "pixelbert_dist.finetune", "pixelbert_dist.export",
                   "data_pipeline.shard", "data_pipeline.index"):
        assert found[module], module
    pretrain = [" ".join(c) for c in found["pixelbert_dist.pretrain"]]
    assert any("--config configs/pretrain/tiny-cpu.yaml" in c for c in pretrain)
    assert any(c.startswith("python -m pixelbert_dist.tokenizer") for c in pretrain)  # the vocab it needs
    assert "Over 300 lines" not in help_text("data_pipeline.shard")  # a maintainers' note, not help


def test_the_config_tool_reads_fine_tuning_configs(capsys):
    for path in sorted((REPO / "configs" / "finetune").glob("*.yaml")):
        assert config_help.main([str(path)]) == 0, capsys.readouterr().err
        assert "task" in yaml.safe_load(capsys.readouterr().out)
    assert config_help.main([str(REPO / "configs" / "pretrain" / "tiny-cpu.yaml"), "--task.name=nlvr2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["task"]["name"] == "nlvr2"
    assert config_help.main([str(REPO / "configs" / "pretrain" / "tiny-cpu.yaml")]) == 0
    assert "task" not in yaml.safe_load(capsys.readouterr().out)  # pre-training has none
    config_help.main(["--help"])
    assert "--task.init=''" in capsys.readouterr().out
    assert config_help.main([str(REPO / "configs" / "finetune" / "vqa-r50.yaml"), "--task.nmae=vqa"]) == 2
    assert "task.nmae" in capsys.readouterr().err
