"""``dsbuild``: the command line. Flags are derived from ``builder.specs.RunSpec``; all logic lives elsewhere."""

from __future__ import annotations

import functools
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

import click

from builder import __version__
from builder.errors import DsbuildError
from builder.specs import RunSpec, resolve_spec


# ---------------------------------------------------------------------------------------------------------------
# Options derived from the spec

def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a spec field's annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _click_type(args[0])
    if origin is list:
        return str, True
    if annotation is bool:
        return bool, False
    if annotation in (int, float, str):
        return annotation, False
    if annotation is Path:
        return click.Path(path_type=Path), False
    return str, False


def spec_options(*names: str) -> Callable:
    """Decorate a command with flags for the named spec fields (all of them when none are named)."""
    fields = RunSpec.model_fields
    chosen = names or tuple(fields)

    def decorate(fn: Callable) -> Callable:
        for name in reversed(chosen):
            field = fields[name]
            ctype, multiple = _click_type(field.annotation)
            flag = "--" + name.replace("_", "-")
            help_text = field.description or ""
            if ctype is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(fn)
            else:
                default_txt = field.default if field.default not in (None, []) else None
                if default_txt is not None:
                    help_text += f"  [default: {default_txt}]"
                fn = click.option(flag, name, type=ctype, multiple=multiple, default=None, help=help_text)(fn)
        fn.__spec_fields__ = chosen  # type: ignore[attr-defined]
        return fn
    return decorate


def common_options(fn: Callable) -> Callable:
    fn = click.option("--config", "config_file", type=click.Path(path_type=Path),
                      help="YAML file with defaults for any option (DSBUILD_<OPTION> env vars override it).")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug output.")(fn)
    return fn


def spec_from(kwargs: dict[str, Any], config_file: Path | None) -> RunSpec:
    cli_values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    cli_values = {k: v for k, v in cli_values.items() if v is not None and v != []}
    return resolve_spec(cli=cli_values, config_file=config_file)


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = kwargs.get("verbose", False)
        try:
            return fn(*args, **kwargs)
        except DsbuildError as exc:
            if verbose:
                import traceback

                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing partial is kept (rerun to continue)", err=True)
            sys.exit(130)
    return wrapper


# ---------------------------------------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dsbuild")
def main() -> None:
    """dsbuild: DeepSeek-V3.2 -> sharded TensorRT-LLM deployment behind Triton Inference Server.

    Stages: plan -> fetch -> quantize -> build -> package. Each stage subcommand builds what it needs first;
    `dsbuild run` runs them all. Outputs go to build/<run-name>/ with a manifest.json; unchanged stages are cached.
    """


def _print_summary(results, *, as_json: bool, run_dir: Path, total_s: float) -> None:
    if as_json:
        click.echo(json.dumps({"run_dir": str(run_dir), "stages": [
            {"stage": r.name, "status": r.status, "key": r.key, "wall_s": round(r.wall_s, 3), "bytes": r.bytes,
             "info": r.info} for r in results]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsbuild {run_dir}  ({total_s:.1f} s)")
    for col in ("stage", "status", "wall time", "bytes", "key"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.status, f"{r.wall_s:.2f} s", _human(r.bytes), r.key[:12])
    Console(stderr=True).print(table)
    for r in results:
        if r.info.get("plan"):
            click.echo(f"  {r.name}: {r.info['plan']}", err=True)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _run_stages(spec: RunSpec, through: str | None, *, force: tuple[str, ...], dry_run: bool, as_json: bool,
                wait: bool) -> None:
    from builder.pipeline import run_pipeline, update_latest
    from builder.stages import all_stages, stages_through

    stages = stages_through(through) if through else all_stages()
    names = {s.name for s in all_stages()}
    for f in force:
        if f not in names and f != "all":
            raise click.BadParameter(f"unknown stage {f!r}; stages are {', '.join(sorted(names))}", param_hint="--force")
    forced = {stages[0].name} if "all" in force else set(force)
    run_dir = spec.run_dir()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    results = run_pipeline(spec, stages, run_dir=run_dir, force=forced, dry_run=dry_run, wait=wait, log=log)
    if not dry_run and through is None:
        update_latest(run_dir)
    _print_summary(results, as_json=as_json, run_dir=run_dir, total_s=time.perf_counter() - t0)


def _stage_command(name: str, help_text: str):
    @main.command(name=name, help=help_text)
    @spec_options()
    @common_options
    @click.option("--force", multiple=True, help="Rebuild this stage (and everything after it) even if cached.")
    @click.option("--dry-run", is_flag=True, help="Print what each stage would do and whether it is cached.")
    @click.option("--json", "as_json", is_flag=True, help="Print the stage summary as JSON.")
    @click.option("--wait", is_flag=True, help="Wait for another dsbuild process working on the same run directory.")
    @handle_errors
    def command(config_file, verbose, force, dry_run, as_json, wait, **kwargs):
        spec = spec_from(kwargs, config_file)
        _run_stages(spec, None if name == "run" else name, force=force, dry_run=dry_run, as_json=as_json, wait=wait)
    return command


_stage_command("run", "Run every stage: plan, fetch, quantize, build (cached stages are skipped).")
_stage_command("fetch", "Get the checkpoint (tiny, local directory or hub) into the run's weights/, verified.")
_stage_command("quantize", "Convert the fetched checkpoint to --quant into the run's quantized/.")
_stage_command("build", "Write per-rank engines (rank shards + config) into the run's engines/.")


@main.command("plan")
@spec_options()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object (layouts, recommended).")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), help="Write the throughput/latency plot (PNG).")
@click.option("--top", type=int, default=15, show_default=True, help="Feasible layouts shown in the table.")
@handle_errors
def plan_cmd(config_file, verbose, as_json, plot_file, top, **kwargs):
    """Choose and justify TP x PP x EP x attention-DP for the model on the cluster.

    Layout flags (--tp/--pp/--ep/--attention-dp, from the command line, --config or DSBUILD_*) fix those
    dimensions; the others are searched. Exits non-zero when no layout is feasible.
    """
    spec = spec_from(kwargs, config_file)
    from builder.errors import LayoutError
    from builder.plan.explain import render_table
    from builder.plan.plot import plot_plan
    from builder.stages.plan import plan_for_spec

    fixed = {k for k in ("tp", "pp", "ep", "attention_dp") if k in spec.model_fields_set}
    result = plan_for_spec(spec, fixed=fixed, requested=len(fixed) == 4)
    if plot_file:
        plot_plan(result, plot_file)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        render_table(result, limit=top)
    if result.recommended is None:
        from builder.plan.explain import rationale

        click.echo(f"error: {rationale(result)}", err=True)
        sys.exit(LayoutError.exit_code)


@main.command("make-tiny")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write (must not exist).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="tiny (target) or tiny-draft.")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def make_tiny_cmd(out: Path, seed: int, preset_name: str, verbose: bool):
    """Write a small checkpoint in exactly DeepSeek-V3.2's layout (block FP8, shards, index, tokenizer)."""
    from builder.errors import SpecError
    from builder.model.tiny import make_tiny

    if out.exists():
        raise SpecError(f"{out} already exists; refusing to overwrite it")
    make_tiny(out, seed=seed, preset_name=preset_name)
    click.echo(str(out))


# ---------------------------------------------------------------------------------------------------------------
# Registry: push / pull deployments as OCI artifacts

def _transfer_progress(label: str):
    """A rich progress bar on stderr; returns the ``progress(total) -> hook(nbytes)`` factory push/pull take."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def start(total: int):
        task = bar.add_task(label, total=total)
        bar.start()
        return lambda n: bar.advance(task, n)

    def stop() -> None:
        if bar.live.is_started:
            bar.stop()
    return stop, start


def _registry_options(fn: Callable) -> Callable:
    fn = click.option("--insecure", is_flag=True,
                      help="Talk plain HTTP to this registry (only for a registry you know serves no TLS, e.g. "
                           "127.0.0.1:5000). Without it dsbuild uses HTTPS and never falls back; credentials are "
                           "sent over plain HTTP only to loopback hosts.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")(fn)
    return fn


@main.command("push")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("reference")
@click.option("--include-weights", is_flag=True,
              help="Also push quantized/ (the checkpoint the GPU flavour loads). By default the artifact holds "
                   "engines/ (rank shards, config.json, llm_api.yaml), package/ (Triton repository, launch files, "
                   "Dockerfile), plan/ and manifest.json.")
@_registry_options
@handle_errors
def push_cmd(run_dir: Path, reference: str, include_weights: bool, insecure: bool, as_json: bool, verbose: bool):
    """Push RUN_DIR to REFERENCE (oci://REGISTRY/REPO[:TAG]) as one OCI artifact.

    Without a tag the tag is derived from the run: <model>-<quant>-<layout>-trtllm<version>-<gpu>-<commit or key>.
    Blobs the registry already has are not uploaded again. Credentials: DSBUILD_REGISTRY_USER and
    DSBUILD_REGISTRY_PASSWORD, else the docker config (auths, credHelpers, credsStore).
    """
    from builder.publish import parse_reference, push_run

    ref = parse_reference(reference, allow_digest=False)
    stop, start = _transfer_progress("push")
    try:
        result = push_run(run_dir=run_dir, ref=ref, include_weights=include_weights, insecure=insecure,
                          log=lambda m: click.echo(m, err=True), progress=None if as_json else start)
    finally:
        stop()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    s = result.stats
    click.echo(f"pushed {result.reference}@{result.digest}", err=True)
    click.echo(f"  {result.layers} layers, {_human(result.total_bytes)}; uploaded {s.blobs_uploaded} blobs "
               f"({_human(s.bytes_uploaded)}), {s.blobs_skipped} already in the registry; {result.wall_s:.1f} s",
               err=True)
    click.echo(f"{result.reference}@{result.digest}")


@main.command("pull")
@click.argument("reference")
@click.argument("out", type=click.Path(path_type=Path))
@_registry_options
@handle_errors
def pull_cmd(reference: str, out: Path, insecure: bool, as_json: bool, verbose: bool):
    """Pull REFERENCE (oci://REGISTRY/REPO:TAG or @sha256:...) into OUT, a new or empty directory.

    Every file is checked against the sha256 its manifest.json records; nothing is left under OUT on failure.
    """
    from dataclasses import asdict

    from builder.publish import parse_reference, pull_run

    ref = parse_reference(reference, require_tag=True)
    stop, start = _transfer_progress("pull")
    try:
        result = pull_run(ref=ref, out=out, insecure=insecure, log=lambda m: click.echo(m, err=True),
                          progress=None if as_json else start)
    finally:
        stop()
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))


@main.command("dockerfile")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--include-weights", is_flag=True, help="Also copy quantized/ into the image.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@handle_errors
def dockerfile_cmd(run_dir: Path, include_weights: bool, verbose: bool):
    """Print the Dockerfile that layers RUN_DIR onto NVIDIA's Triton TensorRT-LLM image."""
    from builder.publish.dockerfile import dockerfile_values, render_dockerfile
    from builder.publish.push import artifact_annotations, load_run_manifest, select_stages

    manifest = load_run_manifest(run_dir)
    stages = select_stages(manifest, include_weights=include_weights, log=lambda m: click.echo(m, err=True))
    values = dockerfile_values(annotations=artifact_annotations(manifest, stages),
                               run_name=str(manifest.get("run_name", run_dir.name)),
                               stage_dirs=[manifest["stages"][s]["dir"] for s in stages])
    click.echo(render_dockerfile(values), nl=False)


if __name__ == "__main__":
    main()
