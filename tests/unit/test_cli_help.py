"""Each command offers the options that affect it, with the defaults that apply to it (issue 21 item 5)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.plan.hardware import GPUS, NETWORKS
from builder.specs import STAGE_ORDER, RunSpec, fields_for


def help_text(*command: str) -> str:
    res = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def flags(text: str) -> set[str]:
    return {m for m in re.findall(r"^\s+(--[a-z0-9-]+)", text, flags=re.M)}


def option_help(text: str, flag: str) -> str:
    """The help of one option (click may wrap it onto the next lines), whitespace collapsed."""
    block = re.search(rf"^\s+{flag}\b.*?(?=^\s+-|\Z)", text, flags=re.M | re.S).group(0)
    return " ".join(block.split())


def spec_flags(names) -> set[str]:
    return {"--" + n.replace("_", "-") for n in names}


def test_stage_order_is_the_pipelines():
    from builder.stages import STAGE_NAMES

    assert tuple(n for n in STAGE_NAMES if not n.startswith("draft-")) == STAGE_ORDER


@pytest.mark.parametrize("command", ["fetch", "quantize", "build", "package", "run"])
def test_stage_commands_offer_exactly_the_options_of_the_stages_they_run(command):
    runs = STAGE_ORDER if command == "run" else STAGE_ORDER[: STAGE_ORDER.index(command) + 1]
    offered = flags(help_text(command)) & spec_flags(RunSpec.model_fields)
    assert offered == spec_flags(fields_for(runs))
    # Every spec field is offered by `run`, so nothing is unreachable from the command line.
    if command == "run":
        assert offered == spec_flags(RunSpec.model_fields)


def test_fetch_and_plan_do_not_offer_packaging_or_build_options():
    for command in ("plan", "fetch"):
        offered = flags(help_text(command))
        for unrelated in ("--slurm-partition", "--k8s-pvc", "--fuse-gate-up", "--absorb-mla", "--openai-port",
                          "--image"):
            assert unrelated not in offered, (command, unrelated)
    assert "--calib-size" not in flags(help_text("fetch"))
    assert "--calib-size" in flags(help_text("quantize"))


def test_defaults_shown_are_the_ones_that_apply():
    plan = help_text("plan")
    for flag in ("--tp", "--pp", "--ep", "--attention-dp"):  # the planner searches what is not fixed
        assert option_help(plan, flag).endswith("[default: searched]"), option_help(plan, flag)
    fetch = help_text("fetch")
    assert option_help(fetch, "--tp").endswith("[default: 2]")
    assert option_help(fetch, "--attention-dp").endswith("[default: off]")


def test_choice_lists_come_from_the_tables():
    text = " ".join(help_text("plan").split())
    for name in NETWORKS:
        assert name in text
    for name, gpu in GPUS.items():
        assert (name in text) == (gpu.arch != "cpu") or name == "cpu"
