"""``dsbuild``: the command line. Flags are derived from ``builder.specs.RunSpec``; all logic lives elsewhere."""

from __future__ import annotations

import functools
import json
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from builder import __version__
from builder.errors import DsbuildError
from builder.layout import Layout
from builder.redact import install as install_log_redaction
from builder.redact import redact_urls
from builder.rundir import RunDir
from builder.safeio import dumps_json
from builder.sampling_params import SamplingParams
from builder.specs import STAGE_ORDER, RunSpec, fields_for, resolve_spec

if TYPE_CHECKING:  # torch-free start-up: the engine is imported by the commands that run it
    from builder.engine.speculative import SpeculativeOptions


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


def spec_options(*, stages: tuple[str, ...] = (), names: tuple[str, ...] = (), keyed_only: bool = False,
                 defaults: dict[str, str] | None = None) -> Callable:
    """Decorate a command with flags for the spec fields that ``stages`` read (``builder.specs.fields_for``) or
    the ``names`` given. Each flag's help shows the default that applies to this command (``defaults`` overrides
    the field's own, e.g. the planner searches TP when --tp is not given)."""
    all_fields = RunSpec.model_fields
    chosen = names or fields_for(stages, keyed_only=keyed_only)
    defaults = defaults or {}

    def decorate(fn: Callable) -> Callable:
        for name in reversed(chosen):
            field = all_fields[name]
            ctype, multiple = _click_type(field.annotation)
            flag = "--" + name.replace("_", "-")
            help_text = field.description or ""
            default_txt = defaults.get(name)
            if default_txt is None and field.default not in (None, []):
                default_txt = ("on" if field.default else "off") if ctype is bool else str(field.default)
            if default_txt is not None:
                help_text += f"  [default: {default_txt}]"
            if ctype is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(fn)
            else:
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
    spec = resolve_spec(cli=cli_values, config_file=config_file)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # so a later refusal of a value can say where it came from
        ctx.meta["dsbuild.spec"] = spec
    return spec


def _with_origin(exc: DsbuildError) -> str:
    """The error's sentence, plus where the refused option's value came from when the error names one."""
    option = getattr(exc, "option", None)
    ctx = click.get_current_context(silent=True)
    spec = ctx.meta.get("dsbuild.spec") if ctx is not None else None
    where = spec.origin_of(option) if option is not None and spec is not None else None
    return f"{exc} (--{option.replace('_', '-')} from {where})" if where else str(exc)


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = kwargs.get("verbose", False)
        try:
            return fn(*args, **kwargs)
        except DsbuildError as exc:
            if verbose:
                import traceback

                click.echo(redact_urls(traceback.format_exc()), err=True, nl=False)
            click.echo(f"error: {redact_urls(_with_origin(exc))}", err=True)  # no URL credentials, whoever wrote the message
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing partial is kept (rerun to continue)", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception:  # a bug: shown with its traceback, still without URL credentials
            import traceback

            click.echo(redact_urls(traceback.format_exc()), err=True, nl=False)
            sys.exit(1)
    return wrapper


# ---------------------------------------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dsbuild")
def main() -> None:
    """dsbuild: DeepSeek-V3.2 -> sharded TensorRT-LLM deployment behind Triton Inference Server.

    Stages: plan -> fetch -> quantize -> build -> package. Each stage subcommand builds what it needs first;
    `dsbuild run` runs them all. Outputs go to build/<run-name>/ with a manifest.json; unchanged stages are cached.
    """
    install_log_redaction()


def _print_summary(results, *, as_json: bool, run_dir: Path, total_s: float,
                   gpu_host: dict[str, Any] | None = None) -> None:
    from builder.hostfit import instructions_text

    if as_json:
        out: dict[str, Any] = {"run_dir": str(run_dir), "stages": [
            {"stage": r.name, "status": r.status, "key": r.key, "wall_s": round(r.wall_s, 3), "bytes": r.bytes,
             "info": r.info} for r in results]}
        if gpu_host:
            out["stages"] += [{"stage": s, "status": "left for GPU host"} for s in gpu_host["stages"]]
            out["left_for_gpu_host"] = gpu_host
        click.echo(dumps_json(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsbuild {run_dir}  ({total_s:.1f} s)")
    for col in ("stage", "status", "wall time", "bytes", "key"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.status, f"{r.wall_s:.2f} s", _human(r.bytes), r.key[:12])
    for s in (gpu_host or {}).get("stages", []):
        table.add_row(s, "left for GPU host", "-", "-", "-")
    Console(stderr=True).print(table)
    for r in results:
        plan = r.info.get("plan")
        if plan:
            click.echo(f"  {r.name}: {plan.get('summary', '') if isinstance(plan, dict) else plan}", err=True)
    if gpu_host:
        click.echo(instructions_text(gpu_host), err=True)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _run_stages(spec: RunSpec, through: str | None, *, force: tuple[str, ...], dry_run: bool, as_json: bool,
                wait: bool) -> None:
    from builder.hostfit import gpu_host_instructions, host_fit
    from builder.pipeline import check_latest, run_pipeline, update_latest
    from builder.stages import all_stages, stages_through

    stages = stages_through(spec, through) if through else all_stages(spec)
    names = {s.name for s in stages}
    for f in force:
        if f not in names and f != "all":
            raise click.BadParameter(f"unknown stage {f!r}; stages are {', '.join(sorted(names))}", param_hint="--force")
    forced = {stages[0].name} if "all" in force else set(force)
    run_dir = spec.run_dir()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    # Up front, from sizes: stages this host should not start (a 690 GB checkpoint on a few CPU cores).
    fit = host_fit(spec, [s.name for s in stages])
    if fit.deferred:
        log(f"this host runs {', '.join(s.name for s in stages if s.name not in fit.deferred)}; "
            f"{', '.join(fit.deferred)} are left for the GPU host: {fit.reason}")
        stages = [s for s in stages if s.name not in fit.deferred]
    updates_latest = not dry_run and through is None and not fit.deferred
    if updates_latest:
        check_latest(run_dir)  # before hours of stages, not after them
    results = run_pipeline(spec, stages, run_dir=run_dir, force=forced, dry_run=dry_run, wait=wait, log=log)
    if updates_latest:
        update_latest(run_dir)
    gpu_host = None
    if fit.deferred:
        fetched = next((r for r in results if r.name == "fetch"), None)
        info = fetched.info if fetched else {}
        planned = info.get("plan") if isinstance(info.get("plan"), dict) else {}
        commit = info.get("commit") or planned.get("commit") or _manifest_commit(run_dir)
        gpu_host = gpu_host_instructions(spec, fit, commit=commit)
    _print_summary(results, as_json=as_json, run_dir=run_dir, total_s=time.perf_counter() - t0, gpu_host=gpu_host)


def _manifest_commit(run_dir: Path) -> str | None:
    try:
        return json.loads(RunDir(run_dir).manifest.read_text())["stages"]["fetch"]["extra"].get("commit")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stage_command(name: str, help_text: str):
    runs = STAGE_ORDER if name == "run" else STAGE_ORDER[: STAGE_ORDER.index(name) + 1]

    @main.command(name=name, help=help_text)
    @spec_options(stages=runs)
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


_stage_command("run", "Run every stage: plan, fetch, quantize, build, package (cached stages are skipped).")
_stage_command("fetch", "Get the checkpoint (tiny, local directory or hub) into the run's weights/, verified.")
_stage_command("quantize", "Convert the fetched checkpoint to --quant into the run's quantized/.")
_stage_command("build", "Write per-rank engines (rank shards + config) into the run's engines/.")
_stage_command("package", "Render the Triton model repository and launch files into the run's package/.")


@main.command("serve")
@click.option("--repo", type=click.Path(path_type=Path), default=Path("build/latest/package/triton_repo"),
              show_default=True, help="Triton model repository (a run's package/triton_repo).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP, gRPC and metrics ports bind.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0: a free port, printed.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="0: a free port, printed.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True,
              help="0: a free port, printed.")
@click.option("--ready-timeout", type=float, default=600, show_default=True,
              help="Seconds to wait for the model to load.")
@click.option("--max-restarts", type=int, default=2, show_default=True,
              help="Restarts of an unhealthy server (crashed python stub) before giving up.")
@click.option("--exit-timeout", type=int, default=20, show_default=True,
              help="Seconds Triton waits for in-flight requests on SIGTERM.")
@click.option("--log-file", type=click.Path(path_type=Path), help="Write tritonserver's log here.")
@click.option("--openai-port", type=click.IntRange(0, 65535),
              help="Also serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) here "
                   "(0: a free port, printed).")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def serve_cmd(repo, host, http_port, grpc_port, metrics_port, ready_timeout, max_restarts, exit_timeout, log_file,
              openai_port, verbose):
    """Serve a model repository with a real tritonserver (the container's on GPU hosts, else the nvidia-pytriton
    wheel's) until SIGTERM or Ctrl-C; with --openai-port, an OpenAI-compatible endpoint in front of it."""
    from builder.errors import ServeError
    from triton_repo.interface import MODEL_NAME
    from triton_repo.openai_api.server import EndpointProcess
    from triton_repo.server import Ports, resolve_ports, serve_forever

    if not (repo / MODEL_NAME / "config.pbtxt").is_file():
        raise ServeError(f"{repo} is not a dsbuild Triton repository (no {MODEL_NAME}/config.pbtxt); "
                         "run `dsbuild package` first")
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    asked = Ports(http_port, grpc_port, metrics_port)
    openai_asked = () if openai_port is None else (openai_port,)
    ports, openai_chosen = resolve_ports(asked, host, extra=openai_asked)
    named = [("http", asked.http, ports.http), ("grpc", asked.grpc, ports.grpc),
             ("metrics", asked.metrics, ports.metrics), *zip(("openai",) * len(openai_chosen), openai_asked,
                                                             openai_chosen)]
    chosen = [f"{name} {host}:{port}" for name, was, port in named if was == 0]
    if chosen:
        log(f"free ports chosen: {', '.join(chosen)}")
    endpoint = None
    if openai_chosen:
        endpoint = EndpointProcess(triton_url=f"{host}:{ports.grpc}", repo=repo, host=host, port=openai_chosen[0],
                                   log=log).start()
    try:
        rc = serve_forever(repo=repo, ports=ports, host=host,
                           models=[MODEL_NAME], ready_timeout=ready_timeout, max_restarts=max_restarts,
                           exit_timeout_s=exit_timeout, log_path=log_file, log=log)
    finally:
        if endpoint is not None:
            endpoint.stop()
    sys.exit(rc)


@main.command("openai")
@click.option("--triton-url", default="127.0.0.1:8001", show_default=True, help="The Triton server's gRPC HOST:PORT.")
@click.option("--repo", type=click.Path(path_type=Path), default=Path("build/latest/package/triton_repo"),
              show_default=True, help="The Triton repository it serves (the checkpoint's tokenizer files are "
                                      "found through it).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path),
              help="Read the tokenizer files here instead (the GPU flavour's checkpoint path as seen from this host).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the endpoint binds.")
@click.option("--port", type=click.IntRange(1, 65535), default=9000, show_default=True)
@click.option("--model-name", default="tensorrt_llm", show_default=True, help="The model id clients ask for.")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def openai_cmd(triton_url, repo, tokenizer_dir, host, port, model_name, verbose):
    """An OpenAI-compatible endpoint (/v1/models, /v1/completions, /v1/chat/completions, streaming as server-sent
    events) in front of a running Triton server, with DeepSeek-V3.2's chat encoding."""
    from triton_repo.openai_api.server import run

    run(triton_url=triton_url, repo=repo, host=host, port=port, model_name=model_name, tokenizer_dir=tokenizer_dir,
        log=lambda m: click.echo(m, err=True))


@main.command("bench")
@click.option("--url", required=True, help="Server HOST:PORT or grpc:// / http:// URL (the scheme sets the protocol): "
                                         "Triton's gRPC port for grpc, its HTTP port for http, the OpenAI-compatible "
                                         "endpoint's port for openai.")
@click.option("--protocol", type=click.Choice(["grpc", "http", "openai"]), default=None,
              help="openai: streamed /v1/completions of `dsbuild serve --openai-port` / `dsbuild openai`.  "
                   "[default: the URL's scheme, else grpc]")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=Path("build/latest"), show_default=True,
              help="The served run: its engines/ give the tokenizer, its manifest the planner's prediction.")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--isl", default="128", show_default=True, help="Input tokens per request: MEAN or MEAN:STD.")
@click.option("--osl", default="64", show_default=True, help="Output tokens per request (max_tokens): MEAN or MEAN:STD.")
@click.option("--num-requests", type=click.IntRange(1), default=32, show_default=True, help="Requests per level.")
@click.option("--request-rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Poisson arrivals at this many requests/s (in flight capped at the concurrency); "
                   "default: closed loop.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True,
              help="Warm-up requests per level, excluded from the figures.")
@click.option("--dataset", type=click.Path(path_type=Path), help="Real prompts: JSON Lines with \"prompt\", or text lines.")
@click.option("--ttft-ms", type=click.FloatRange(0, min_open=True), help="Goodput: TTFT limit.")
@click.option("--tpot-ms", type=click.FloatRange(0, min_open=True), help="Goodput: TPOT limit.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=600, show_default=True,
              help="Seconds one request may take.")
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON (docs/bench.md).")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the JSON result to this file.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG plot here.")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def bench_cmd(url, protocol, run_dir, concurrency, isl, osl, num_requests, request_rate, seed, warmup, dataset, ttft_ms,
              tpot_ms, timeout, as_json, output, plot_path, verbose):
    """Benchmark a served model: streamed requests at each concurrency; TTFT, TPOT = (latency - TTFT) /
    (output tokens - 1), inter-token and end-to-end latency, throughput, goodput, errors; next to the planner's
    prediction for the run's layout."""
    from builder.atomic import atomic_write_json
    from builder.errors import SpecError
    from triton_repo.bench import BenchConfig, Length, plot, print_tables, run_bench

    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        raise SpecError(f"--concurrency must be comma-separated integers, got {concurrency!r}") from None
    from triton_repo.client import endpoint

    ep = endpoint(url, "http" if protocol == "openai" else protocol)
    if ep.scheme != "http":
        raise SpecError(f"--url {url!r}: dsbuild bench talks plain HTTP or gRPC, not {ep.scheme}")
    protocol = protocol if protocol == "openai" else ep.protocol
    cfg = BenchConfig(url=ep.address, engines_dir=RunDir(run_dir).engines, protocol=protocol, concurrency=levels,
                      isl=Length.parse(isl, what="--isl"), osl=Length.parse(osl, what="--osl"),
                      num_requests=num_requests, request_rate=request_rate, seed=seed, warmup=warmup, dataset=dataset,
                      ttft_ms=ttft_ms, tpot_ms=tpot_ms, timeout_s=timeout)
    result = run_bench(cfg, run_dir=run_dir, show_progress=sys.stderr.isatty() or not as_json)
    if output:
        atomic_write_json(output, result)
    if plot_path:
        plot(result, plot_path)
    if as_json:
        click.echo(dumps_json(result, indent=2))
    else:
        print_tables(result)


@main.command("plan")
@spec_options(names=fields_for(("plan",), keyed_only=True) + ("draft_model",),  # --spec draft needs it
              defaults={**{f.name: "searched" for f in fields(Layout)},
                        "gpu": "cpu, a host sized to the layout"})
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
    from builder.plan.spec import LAYOUT_FIELDS, plan_for_spec

    fixed = {k for k in LAYOUT_FIELDS if k in spec.model_fields_set}
    result = plan_for_spec(spec, fixed=fixed, requested=len(fixed) == len(LAYOUT_FIELDS))
    if plot_file:
        plot_plan(result, plot_file)
    chosen = result.requested or result.recommended
    trtllm = None
    if chosen is not None:
        from builder.model.source import resolve_model
        from builder.trtllm.llm_api import plan_info

        trtllm = plan_info(spec, resolve_model(spec.model).config, chosen.layout)
    if as_json:
        click.echo(dumps_json({**result.to_dict(), **({"trtllm": trtllm} if trtllm else {})}, indent=1))
    else:
        render_table(result, limit=top)
        for line in (trtllm or {}).get("lines", []):
            click.echo(f"TensorRT-LLM ({trtllm['layout']}): {line}")
    if result.recommended is None:
        from builder.plan.explain import rationale

        click.echo(f"error: {rationale(result)}", err=True)
        sys.exit(LayoutError.exit_code)


@main.command("make-tiny")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory to write (must not exist). With --train: one checkpoint and report per model inside.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random init seed (training seed with --train).")
@click.option("--preset", "preset_name", default=None,
              help="tiny / tiny-draft (the committed trained weights), tiny-random / tiny-draft-random (seeded "
                   "random init). With --train: tiny or tiny-draft (default both).")
@click.option("--train", "do_train", is_flag=True,
              help="Train on the shipped corpus (CPU, deterministic) instead of using the committed weights.")
@click.option("--steps", type=int, default=None, help="With --train: override the recipe's step count (quick runs).")
@click.option("--jobs", type=int, default=2, show_default=True, help="With --train: models trained in parallel.")
@click.option("--write-builtin", is_flag=True, help="With --train: replace the committed weights in builder/data/trained.")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def make_tiny_cmd(out: Path, seed: int, preset_name: str | None, do_train: bool, steps: int | None, jobs: int,
                  write_builtin: bool, verbose: bool):
    """Write a small checkpoint in exactly DeepSeek-V3.2's layout (block FP8, shards, index, tokenizer)."""
    from builder.errors import SpecError

    if out.exists():
        raise SpecError(f"{out} already exists; refusing to overwrite it")
    if not do_train:
        if steps is not None or write_builtin:
            raise SpecError("--steps and --write-builtin only apply with --train")
        from builder.model.config import generated_model
        from builder.model.tiny import make_tiny

        preset, trained = generated_model(preset_name or "tiny")
        if trained:
            from builder.model.trained import export_builtin

            export_builtin(out, preset)
        else:
            make_tiny(out, seed=seed, preset_name=preset)
        click.echo(str(out))
        return
    from builder.train.trainer import RECIPES

    presets = [preset_name] if preset_name else list(RECIPES)
    unknown = [p for p in presets if p not in RECIPES]
    if unknown:
        raise SpecError(f"--train knows the presets {sorted(RECIPES)}, not {unknown[0]!r}")
    if steps is not None and steps < 1:
        raise SpecError(f"--steps must be at least 1, got {steps}")
    if jobs < 1:
        raise SpecError(f"--jobs must be at least 1, got {jobs}")
    from builder.train.run import summary_lines, train_models

    reports = train_models(out=out, presets=presets, seed=seed, steps=steps, jobs=jobs, write_builtin=write_builtin)
    for line in summary_lines(reports):
        click.echo(line)
    click.echo(f"checkpoints and reports in {out}")


# ---------------------------------------------------------------------------------------------------------------
# The reference engine

def _engine_options(fn: Callable) -> Callable:
    fn = click.option("--engine", "engine_dir", type=click.Path(path_type=Path), required=True,
                      help="Engine bundle directory (a run's engines/).")(fn)
    fn = click.option("--threads-per-rank", type=int, default=None,
                      help="CPU threads per rank (default: cores / ranks).")(fn)
    fn = click.option("--python", "python_executable", default=None,
                      help="Python interpreter for the worker ranks (default: this one).")(fn)
    return fn


# CLI defaults that differ from the record's (a served request without max_tokens gets 16, as TensorRT-LLM's model).
GENERATE_DEFAULTS = {"max_tokens": 32}


def sampling_options(fn: Callable) -> Callable:
    """Flags for every ``SamplingParams`` field (help from the record; values checked by its ``validate``)."""
    for f in reversed(fields(SamplingParams)):
        flag = "--" + f.name.replace("_", "-")
        default = GENERATE_DEFAULTS.get(f.name, f.default)
        if f.name == "stop":
            fn = click.option(flag, "stop", multiple=True, help=f.metadata["help"] + " Repeatable; with --url.")(fn)
            continue
        kind = {"INT32": int, "UINT64": int, "FP32": float}[f.metadata["dtype"]]
        shown = "" if default is None else f"  [default: {default}]"
        fn = click.option(flag, f.name, type=kind, default=default, help=f.metadata["help"] + shown)(fn)
    return fn


@main.command("generate")
@click.option("--url", help="A Triton server: grpc://HOST:PORT or http(s)://HOST:PORT (the scheme sets the protocol), or "
                           "HOST:PORT (gRPC unless --protocol http); no port: Triton's default (8001 / 8000).")
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path),
              help="Engine bundle directory (a run's engines/): run the reference engine here, no server.")
@click.option("--prompt", required=True, help="Prompt text.")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, finish_reason, ...).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default=None,
              help="With --url: gRPC (tritonclient stream) or HTTP (Triton's generate extension).  [default: the "
                   "URL's scheme, else grpc]")
@click.option("--stream/--no-stream", default=False, help="With --url: print text as the server streams it.")
@click.option("--model-name", default="tensorrt_llm", show_default=True, help="With --url: the served model.")
@click.option("--timeout", type=float, default=300, show_default=True, help="With --url: seconds to wait.")
@click.option("--threads-per-rank", type=int, default=None,
              help="With --engine: CPU threads per rank (default: cores / ranks).")
@click.option("--python", "python_executable", default=None,
              help="With --engine: Python interpreter for the worker ranks (default: this one).")
@click.option("--ignore-eos", is_flag=True, help="With --engine: do not stop at the model's end-of-sentence token.")
@spec_options(names=("spec", "draft_len"))
@click.option("--draft-engine", type=click.Path(path_type=Path), default=None,
              help="With --engine --spec draft: the draft model's bundle (default: ENGINE/draft, as `dsbuild build "
                   "--spec draft` writes it).")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def generate_cmd(url, engine_dir, prompt, as_json, protocol, stream, model_name, timeout, threads_per_rank,
                 python_executable, ignore_eos, spec, draft_len, draft_engine, verbose, stop, **sampling):
    """Generate text from a served model (--url) or with the reference engine on this host (--engine)."""
    from builder.errors import SpecError

    if bool(url) == bool(engine_dir):
        raise SpecError("pass exactly one of --url (a Triton server) or --engine (a run's engines/ directory)")
    if url and spec not in (None, "none"):
        raise SpecError("--spec applies to --engine; a served model's speculative decoding is fixed at build time")
    if engine_dir and stop:
        raise SpecError("--stop applies to --url (the served model matches stop strings); with --engine, "
                        "generation ends at the model's end-of-sentence token or --max-tokens")
    params = SamplingParams(stop=tuple(stop), **sampling).validate()
    if url:
        _generate_remote(url=url, prompt=prompt, params=params, protocol=protocol, stream=stream,
                         model_name=model_name, timeout=timeout, as_json=as_json)
    else:
        _generate_direct(engine_dir=engine_dir, threads_per_rank=threads_per_rank,
                         python_executable=python_executable, prompt=prompt, params=params, ignore_eos=ignore_eos,
                         as_json=as_json, speculative=_speculative_options(engine_dir, spec, draft_len, draft_engine))


def _speculative_options(engine_dir: Path, spec: str | None, draft_len: int | None,
                         draft_engine: Path | None) -> SpeculativeOptions | None:
    from builder.engine.speculative import SpeculativeOptions

    if spec in (None, "none"):
        return None
    n = RunSpec.model_fields["draft_len"].default if draft_len is None else draft_len
    return SpeculativeOptions(mode=spec, draft_len=n, draft_engine=str(
        draft_engine or RunDir.of_engines(engine_dir).draft_bundle) if spec == "draft" else None)


def _generate_remote(*, url: str, prompt: str, params: SamplingParams, protocol: str, stream: bool,
                     model_name: str, timeout: float, as_json: bool) -> None:
    from triton_repo.client import GenerateOptions, generate

    shown = [""]

    def show(text: str) -> None:  # responses carry cumulative text: print only what is new
        text = text.rstrip("\ufffd")  # a character whose bytes are not all generated yet
        if text.startswith(shown[0]):
            click.echo(text[len(shown[0]):], nl=False)
            shown[0] = text

    result = generate(url, GenerateOptions(prompt=prompt, sampling=params, stream=stream), protocol=protocol,
                      model=model_name, timeout=timeout, on_text=show if stream and not as_json else None)
    if as_json:
        click.echo(dumps_json(result.to_json(), indent=2))
    elif stream:
        rest = result.text[len(shown[0]):] if result.text.startswith(shown[0]) else "\n" + result.text
        click.echo(rest)
    else:
        click.echo(result.text)


def _generate_direct(*, engine_dir: Path, threads_per_rank: int | None, python_executable: str | None, prompt: str,
                     params: SamplingParams, ignore_eos: bool, as_json: bool,
                     speculative: SpeculativeOptions | None = None) -> None:
    from builder.engine.service import EngineService, GenerationRequest
    from builder.engine.text import encode_prompt
    from builder.errors import ServeError

    with EngineService(engine_dir, threads_per_rank=threads_per_rank, python_executable=python_executable) as svc:
        tok = svc.tokenizer()
        ids = encode_prompt(svc.bundle, tok, prompt)
        eos = svc.bundle.cfg.raw.get("eos_token_id")
        stops = [] if ignore_eos else [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
        req = GenerationRequest(prompt_ids=ids, sampling=params, stop_token_ids=stops)
        t0 = time.perf_counter()
        streamed: list[int] = []
        shown = [""]

        def on_token(_i: int, token: int) -> None:  # stream the text as it grows (whole characters only)
            if as_json:
                return
            streamed.append(token)
            now = tok.decode(streamed)
            if now.startswith(shown[0]) and not now.endswith("\ufffd"):
                click.echo(now[len(shown[0]):], nl=False)
                shown[0] = now
        res = svc.generate([req], on_token=on_token, speculative=speculative)[0]
        wall = time.perf_counter() - t0
    if res.finish_reason == "error":  # this request's own failure (e.g. non-finite logits): one sentence
        if shown[0]:
            click.echo("", err=False)
        raise ServeError(f"generation failed after {len(res.token_ids)} token(s): {res.error}")
    text = tok.decode(res.token_ids)
    if not as_json and text.startswith(shown[0]):
        click.echo(text[len(shown[0]):], nl=False)
    if as_json:
        click.echo(json.dumps({"text": text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                               "prompt_tokens": len(ids), "total_draft_tokens": res.total_draft_tokens,
                               "total_accepted_draft_tokens": res.total_accepted_draft_tokens,
                               "acceptance_rate": round(res.acceptance_rate, 4),
                               "target_forwards": res.target_forwards, "wall_s": round(wall, 4)}))
    else:
        click.echo("")


@main.command("verify")
@_engine_options
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint the bundle was built from (default: the run's quantized/).")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Largest relative logit error.")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def verify_cmd(engine_dir, threads_per_rank, python_executable, checkpoint, tolerance, gen_tokens, verbose):
    """Compare the reference engine with transformers on fixed prompts; JSON out, non-zero exit beyond tolerance."""
    from builder.engine.verify import verify_engine
    from builder.errors import VerificationError

    report = verify_engine(engine_dir, checkpoint=checkpoint, gen_tokens=gen_tokens, tolerance=tolerance,
                           threads_per_rank=threads_per_rank, python_executable=python_executable)
    click.echo(dumps_json(report, indent=2))
    if not report["ok"]:
        why = "greedy tokens differ" if not report["greedy_match"] else \
            f"max relative logit error {report['max_rel_err']:.2e} exceeds {tolerance:.0e}"
        raise VerificationError(f"the reference engine disagrees with transformers: {why}")


@main.command("check")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@handle_errors
def check_cmd(run_dir: Path, as_json: bool, verbose: bool):
    """Hold every generated file of RUN_DIR (a run or a pulled deployment) against the plan, against each other and
    against the pinned TensorRT-LLM's contract (docs/tensorrt-llm-contract.md): one line per disagreement on stdout,
    exit 14 if there is any. The package stage runs the same check."""
    from builder.check import check_run, require_conformance

    report = check_run(run_dir)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines:
            click.echo(line)
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        if report.ok:
            click.echo(f"{run_dir}: {len(report.checked)} file(s) agree with the plan and TensorRT-LLM's contract",
                       err=True)
    require_conformance(report)


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
                      help="Use TLS without verifying the registry's certificate (as oras --insecure). For a "
                           "registry without TLS use --plain-http.")(fn)
    fn = click.option("--plain-http", is_flag=True,
                      help="Talk plain HTTP to this registry (as oras --plain-http; only for a registry you know "
                           "serves no TLS, e.g. 127.0.0.1:5000). Without it dsbuild uses HTTPS and never falls back; "
                           "credentials are sent over plain HTTP only to loopback hosts.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")(fn)
    return fn


@main.command("push")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("reference")
@click.option("--include-weights", is_flag=True,
              help="Also push quantized/ (and draft-quantized/): the checkpoint(s) the GPU flavour loads. Without it "
                   "the artifact holds plan/, package/ (Triton repository, launch files, Dockerfile), engines/ and "
                   "manifest.json, and a GPU deployment must mount the checkpoint at <deploy dir>/quantized. A GPU "
                   "artifact never carries the reference engine's rank shards (TensorRT-LLM does not load them); a "
                   "CPU artifact does.")
@_registry_options
@handle_errors
def push_cmd(run_dir: Path, reference: str, include_weights: bool, plain_http: bool, insecure: bool, as_json: bool,
             verbose: bool):
    """Push RUN_DIR to REFERENCE (oci://REGISTRY/REPO[:TAG]) as one OCI artifact.

    Without a tag the tag is derived from the run: <model>-<quant>-<layout>-trtllm<version>-<gpu>-<commit or key>.
    Blobs the registry already has are not uploaded again. Credentials: DSBUILD_REGISTRY_USER and
    DSBUILD_REGISTRY_PASSWORD, else the docker config (auths, credHelpers, credsStore).
    """
    from builder.publish import parse_reference, push_run

    ref = parse_reference(reference, allow_digest=False)
    stop, start = _transfer_progress("push")
    try:
        result = push_run(run_dir=run_dir, ref=ref, include_weights=include_weights, plain_http=plain_http,
                          insecure=insecure, log=lambda m: click.echo(m, err=True),
                          progress=None if as_json else start)
    finally:
        stop()
    if as_json:
        click.echo(dumps_json(result.to_json(), indent=2))
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
def pull_cmd(reference: str, out: Path, plain_http: bool, insecure: bool, as_json: bool, verbose: bool):
    """Pull REFERENCE (oci://REGISTRY/REPO:TAG or @sha256:...) into OUT, a new or empty directory.

    Every file is checked against the sha256 its manifest.json records; nothing is left under OUT on failure.
    """
    from dataclasses import asdict

    from builder.publish import parse_reference, pull_run

    ref = parse_reference(reference, require_tag=True)
    stop, start = _transfer_progress("pull")
    try:
        result = pull_run(ref=ref, out=out, plain_http=plain_http, insecure=insecure,
                          log=lambda m: click.echo(m, err=True), progress=None if as_json else start)
    finally:
        stop()
    if as_json:
        click.echo(dumps_json(asdict(result), indent=2))


@main.command("dockerfile")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--include-weights", is_flag=True, help="Also copy quantized/ (and draft-quantized/) into the image; "
              "without it a GPU image needs the checkpoint mounted at /opt/dsbuild/quantized.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@handle_errors
def dockerfile_cmd(run_dir: Path, include_weights: bool, verbose: bool):
    """Print the Dockerfile that layers RUN_DIR onto NVIDIA's Triton TensorRT-LLM image."""
    from builder.publish.dockerfile import dockerfile_values, render_dockerfile
    from builder.publish.push import (artifact_annotations, flavour_of_run, load_run_manifest, omitted_patterns,
                                      select_stages, without_omitted)

    manifest = load_run_manifest(run_dir)
    stages = select_stages(manifest, include_weights=include_weights, log=lambda m: click.echo(m, err=True))
    entries = without_omitted({s: manifest["stages"][s] for s in stages}, omitted_patterns(manifest))
    values = dockerfile_values(annotations=artifact_annotations(manifest, stages),
                               run_name=str(manifest.get("run_name", run_dir.name)),
                               stage_dirs=[e["dir"] for e in entries.values()], flavour=flavour_of_run(manifest),
                               files=[o["path"] for e in entries.values() for o in e["outputs"]])
    click.echo(render_dockerfile(values), nl=False)


if __name__ == "__main__":
    main()
