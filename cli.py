"""LAMB16 experiments: train the MNIST CNN with the optimizers of the registry,
compare them over seeds, plot, reproduce the original README's figures, benchmark.

    python cli.py train --optimizer lamb16 --batch-size 1024 --lr 0.02
    python cli.py compare --epochs 1 --batch-size 1024 --lr 0.02 --seeds 2
    python cli.py reproduce --seeds 3

Thin click commands over the `experiments` package, which does the work.
"""

from dataclasses import replace
from pathlib import Path

import click

import lamb16
import lamb16.native
from experiments import bench as benchmarks
from experiments import parallel, quantization, registry, studies, tuning, widerange
from experiments import sweep as sweeps
from experiments import tensorboard as events
from experiments.config import COMPARE_OPTIMIZERS, DEFAULTS, REPRODUCE_EPOCHS, REPRODUCE_OPTIMIZERS, parse_seeds
from experiments.data import hold_out, load_mnist
from experiments.errors import Interrupted, UserError
from experiments.runs import claim_dir, write_json
from experiments.options import (
    POSITIVE,
    base_config,
    check_tensorboard,
    data_dir_option,
    data_options,
    device_option,
    download_option,
    given_options,
    hyperparameter_options,
    json_option,
    load_data,
    parse_list,
    seeds_of,
    seeds_option,
    target_option,
    tensorboard_option,
    warn_batch,
    write_json_output,
)
from experiments.schedules import SCHEDULES

INTERRUPTED_EXIT = 130  # the shell's code for a command ended by SIGINT


class Commands(click.Group):
    """Every command's user mistakes become one line (exit 1); an interrupted
    run says how to resume it (exit 130)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(parallel.rank_prefix() + str(error)) from None
        except Interrupted as stopped:
            if not parallel.is_main_process():
                ctx.exit(INTERRUPTED_EXIT)
            hint = ctx.meta.get("resume_hint", "python cli.py train --resume {run_dir}").format(run_dir=stopped.run_dir)
            click.echo(f"interrupted: {stopped.run_dir} keeps what was written; resume with: {hint}", err=True)
            ctx.exit(INTERRUPTED_EXIT)


@click.group(cls=Commands, context_settings=dict(help_option_names=["-h", "--help"], max_content_width=110))
@click.version_option(lamb16.__version__, prog_name="lamb16")
@click.pass_context
def cli(ctx) -> None:
    """Train and compare Adam, LAMB, LAMB16 and their peers on MNIST (a 2-layer CNN)."""
    if parallel.launched_processes() > 1 and ctx.invoked_subcommand not in ("train", "bench"):
        raise UserError(f"only train and bench run across processes; start {ctx.invoked_subcommand} with python, "
                        "not torchrun")


@cli.command()
@click.option("--optimizer", type=click.Choice(list(registry.OPTIMIZERS)), default=DEFAULTS.optimizer, show_default=True, help="Optimizer to train with.")
@hyperparameter_options
@seeds_option(None)
@data_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="runs", show_default=True, help="Folder the run directories go in.")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Continue this run directory from its last finished epoch.")
@click.option("--fsdp", is_flag=True, help="Under torchrun, shard the model and optimizer state with FSDP2 (default: DDP).")
@tensorboard_option
@click.pass_context
def train(ctx, optimizer, seed, seeds, data_dir, download, device, progress, out, resume_dir, fsdp, tensorboard,
          **hyperparameters):
    """Train the CNN with one optimizer (one run directory per seed under --out).
    Started by torchrun, it trains on all its processes, each batch split across them.

    \b
    Examples:
      python cli.py train --optimizer lamb16 --batch-size 1024 --lr 0.02 --epochs 10
      python cli.py train --resume runs/lamb16_b1024_lr0.02_wd0.01_seed1
      torchrun --nproc-per-node 2 cli.py train --optimizer lamb16 --fsdp
    """
    check_tensorboard(tensorboard)
    if resume_dir is not None:
        given = given_options(ctx, (*studies.RESUME_OPTIONS, "out"))
        if seeds is not None:
            given["seeds"] = parse_seeds(seeds)
        studies.check_resume_options(resume_dir, given)
        studies.resume(resume_dir, *load_data(data_dir, download, device), data_dir, fsdp=fsdp, bars=progress,
                       echo=click.echo, tensorboard=tensorboard)
        return
    config = replace(base_config(**hyperparameters), optimizer=optimizer)
    seed_list = seeds_of(seeds, seed)
    studies.check_optimizers([optimizer])
    studies.check_options(config)
    train_data, test_data = load_data(data_dir, download, device)
    warn_batch(config, len(train_data))
    studies.train(config, seed_list, out, train_data, test_data, data_dir, fsdp=fsdp, bars=progress, echo=click.echo,
                  tensorboard=tensorboard)


@cli.command()
@click.option("--optimizers", default=",".join(COMPARE_OPTIMIZERS), show_default=True, help=f"Comma-separated, from: {', '.join(registry.OPTIMIZERS)}.")
@hyperparameter_options
@seeds_option("3")
@data_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for the runs, figure.png and results.md [default: a new runs/compare_<setting>].")
@click.option("--resume", is_flag=True, help="--out holds this comparison: skip its finished runs, resume the others.")
@click.option("--log-y", is_flag=True, help="Loss panels on a log scale.")
@tensorboard_option
@click.pass_context
def compare(ctx, optimizers, seed, seeds, data_dir, download, device, progress, out, resume, log_y, tensorboard,
            **hyperparameters):
    """Train several optimizers with the same settings, seeds, initial weights
    and data order; draw mean curves with seed bands and a table of mean ± std.

    \b
    Example:
      python cli.py compare --epochs 1 --batch-size 1024 --lr 0.02 --seeds 2 --optimizers adamw,lamb,lamb16
    """
    check_tensorboard(tensorboard)
    names = studies.check_optimizers([o.strip() for o in optimizers.split(",") if o.strip()])
    base = base_config(**hyperparameters)
    for name in names:
        studies.check_options(replace(base, optimizer=name))
    seed_list = seeds_of(seeds, seed)
    out = studies.comparison_dir(out, resume, base)
    train_data, test_data = load_data(data_dir, download, device)
    warn_batch(base, len(train_data))
    claim_dir(out, "compare")
    ctx.meta["resume_hint"] = f"the same command with --out {out} --resume"
    table, _ = studies.compare(base, names, seed_list, out, train_data, test_data, data_dir, log_y=log_y,
                               bars=progress, echo=click.echo, tensorboard=tensorboard)
    click.echo(table)
    click.echo(f"runs, results.md and figure written to {out}")


@cli.command()
@click.option("--optimizers", default=",".join(REPRODUCE_OPTIMIZERS), show_default=True, help="Comma-separated optimizers to run.")
@click.option("--epochs", type=click.IntRange(min=1), default=REPRODUCE_EPOCHS, show_default=True, help="Epochs per run (the original figures show 10).")
@seeds_option("3")
@data_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="runs/reproduce", show_default=True, help="Folder for runs, figures and results.md.")
@click.option("--resume", is_flag=True, help="--out holds this study: skip its finished runs, resume the others.")
@click.pass_context
def reproduce(ctx, optimizers, epochs, seeds, data_dir, download, device, progress, out, resume):
    """Reproduce both figures of the original README (batch 1024 / lr 0.02 and
    batch 128 / lr 0.01, weight decay 0.01) over seeds; writes their PNGs and
    results.md: each claim next to the measured mean and spread, with a verdict.

    \b
    Example:
      python cli.py reproduce --seeds 3 --out runs/reproduce
    """
    names = studies.check_optimizers([o.strip() for o in optimizers.split(",") if o.strip()])
    seed_list = parse_seeds(seeds)
    studies.check_out(out, resume)
    train_data, test_data = load_data(data_dir, download, device)
    claim_dir(out, "reproduce")
    ctx.meta["resume_hint"] = f"the same command with --out {out} --resume"
    text = studies.reproduce(names, seed_list, out, train_data, test_data, data_dir, epochs=epochs,
                             bars=progress, echo=click.echo)
    click.echo(text)
    click.echo(f"figures and results.md written to {out}")


@cli.command()
@click.option("--preset", type=click.Choice(list(sweeps.PRESETS)), default=None, help="A ready sweep (claims: the original README's claims, each optimizer searched at batch 512, 2048 and 8192 and confirmed on 8 seeds); other options override it.")
@click.option("--optimizers", default=None, help=f"Comma-separated [default: adamw,lamb,lamb16], from: {', '.join(registry.OPTIMIZERS)}.")
@click.option("--lrs", default=None, help="Learning rates, comma-separated (required without --preset).")
@click.option("--batch-sizes", default=None, help=f"Batch sizes, comma-separated [default: {DEFAULTS.batch_size}].")
@click.option("--wds", default=None, help=f"Weight decays, comma-separated [default: {DEFAULTS.wd:g}].")
@seeds_option(None)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help=f"Epochs per run [default: {DEFAULTS.epochs}].")
@click.option("--val-size", type=click.IntRange(min=1), default=None, help="Training images held out to choose the learning rate by [default: 10000].")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="The lr after warmup, shared by every point [default: constant; the claims preset: cosine].")
@click.option("--warmups", default=None, help="Warmup fractions to sweep, comma-separated [default: 0; the claims preset's grid: 0.1].")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Search instead of a grid: this many settings of each optimizer's search space (lr, weight decay, betas, warmup; experiments/registry.py) at each batch size, drawn quasi-randomly [the claims preset: 8].")
@click.option("--confirm-seeds", default=None, help="Then train each chosen setting on these seeds, apart from the choice; the report's verdicts come from them alone: a count (8: the 8 seeds after --seeds) or a list [the claims preset: 8].")
@target_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="runs/sweep", show_default=True, help="The sweep's folder: its runs, reports and (by default) its study.")
@click.option("--storage", default=None, help="Optuna storage URL shared by workers on several machines [default: sqlite in --out].")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local worker processes, a thread each: a point's result is the same whatever their number [default: one per CPU core].")
@click.option("--prune", is_flag=True, help="Stop a point after an epoch where its validation accuracy is clearly below the best of its optimizer, batch size and seed (error over twice the best's) on the first seed; later seeds train only the settings it kept, in full. A later sweep without --prune finishes them.")
@click.option("--retrain", is_flag=True, help="Then train each chosen setting again on all the training images (into --out/retrained).")
@data_options
@click.pass_context
def sweep(ctx, preset, optimizers, lrs, batch_sizes, wds, seeds, epochs, val_size, schedule, warmups, trials,
          confirm_seeds, target, out, storage, workers, prune, retrain, data_dir, download, device, progress):
    """Tune each optimizer at each batch size, over a grid (--lrs, --wds,
    --warmups) or a search space (--trials), each point a run under --out,
    through an Optuna study; the setting chosen by validation; with
    --confirm-seeds, each choice trained again on fresh seeds, which give the
    report's verdicts. Run again (or elsewhere, same --storage) to join or
    resume it, or with more values (lrs, seeds, trials, ...) to extend it.

    \b
    Examples:
      python cli.py sweep --optimizers adamw,lamb16 --lrs 0.005,0.02 --batch-sizes 2048 --seeds 1 --epochs 1
      python cli.py sweep --optimizers adamw,lamb16 --trials 16 --confirm-seeds 8 --batch-sizes 8192 --prune
      python cli.py sweep --preset claims --prune --workers 2
    """
    chosen = sweeps.from_options(preset, optimizers and parse_list(optimizers, list(registry.OPTIMIZERS), "--optimizers"),
                                 lrs, batch_sizes, wds, seeds, epochs, val_size, schedule, warmups, trials,
                                 confirm_seeds)
    sweeps.check_sweep(chosen)
    workers = sweeps.check_workers(workers, echo=lambda line: click.echo(line, err=True))
    train_data, test_data = load_data(data_dir, download, device)
    hold_out(train_data, chosen.val_size)  # a --val-size too large fails here, before the study exists
    out = claim_dir(out, "sweep")
    ctx.meta["resume_hint"] = "the same python cli.py sweep command again (it resumes {run_dir})"
    sweeps.run(chosen, out, storage, data_dir, train_data, test_data, workers=workers, prune=prune,
               retrain_chosen=retrain, echo=click.echo, bars=progress)
    click.echo(tuning.write_report([out], None, target))


@cli.command()
@click.argument("sweep_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for the report of several sweeps together [default: the one sweep's folder].")
@target_option
def report(sweep_dirs, out, target):
    """Write a sweep's results.csv, results.md and figures from its stored runs,
    without training; of several sweeps (other batch sizes, optimizers or seeds), one report.

    \b
    Examples:
      python cli.py report runs/sweep
      python cli.py report runs/claims512 runs/claims8192 --out runs/claims
    """
    click.echo(tuning.write_report(list(sweep_dirs), out, target))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG to write [default: a new figure.png beside the runs].")
@click.option("--title", default=None, help="Figure title [default: from the runs' settings].")
@click.option("--log-y", is_flag=True, help="Loss panels on a log scale.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@tensorboard_option
def plot(run_dirs, output, title, log_y, force, tensorboard):
    """Draw a comparison figure from saved runs, without training: one mean
    curve with a seed band per optimizer and setting.

    RUN_DIRS are run directories, or folders holding them at any depth.

    \b
    Example:
      python cli.py plot runs/compare_b1024_lr0.02_wd0.01
    """
    check_tensorboard(tensorboard)
    runs, table, output = studies.plot(list(run_dirs), output, title, log_y, force,
                                       warn=lambda line: click.echo(line, err=True))
    click.echo(table)
    click.echo(f"figure written to {output}")
    if tensorboard is not None:
        written = events.export_runs([run.path for run in runs], tensorboard)
        click.echo(f"TensorBoard events of {len(written)} runs written under {tensorboard}: "
                   f"tensorboard --logdir {tensorboard}")


@cli.command()
@click.option("--steps", type=click.IntRange(min=10), default=300, show_default=True, help="Training steps of the gradient stream.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=POSITIVE, default=0.01, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@data_dir_option
@download_option
@device_option
def scaling(steps, batch_size, lr, seed, data_dir, download, device):
    """Measure how LAMB16's fp8 scalings keep the moments of real MNIST CNN
    gradients, on the 500-, 25,000- and 400,000-element weight tensors.

    \b
    Example:
      python cli.py scaling --steps 300
    """
    train_data = load_mnist(data_dir, True, studies.device_of(device), download)
    rows = quantization.moment_quantization_table(train_data, steps, batch_size, lr, seed)
    click.echo(f"{steps} steps of LAMB, batch {batch_size}, lr {lr:g}, seed {seed}; relative errors against float32 moments")
    click.echo(quantization.markdown(rows))


@cli.command("widerange")
@click.option("--optimizers", default=None, help=f"Comma-separated, from: {', '.join(widerange.VARIANTS)} [default: all that are installed].")
@click.option("--probes", default=",".join(widerange.PROBES), show_default=True, help="Synthetic probes to run.")
@click.option("--zipf-vocab", type=click.IntRange(min=100), default=16384, show_default=True, help="Tokens of the Zipf model.")
@click.option("--zipf-steps", type=click.IntRange(min=1), default=400, show_default=True, help="Training steps of the Zipf model.")
@click.option("--no-zipf", is_flag=True, help="Skip the Zipf model (the probes take about a minute).")
@click.option("--seed", type=int, default=1, show_default=True)
@json_option("tables")
def wide_range(optimizers, probes, zipf_vocab, zipf_steps, no_zipf, seed, json_path):
    """Measure how each low-bit optimizer's updates stray from its float32
    parent's (LAMB16's: float32 moments; the peers': AdamW) where a tensor's
    values span many decades: rows at scales 8 decades apart, magnitudes spread
    inside every block, half a tensor whose gradients fall 10x; then a Zipf
    token model's rows by frequency, open and closed loop. Nothing downloaded.

    \b
    Example:
      python cli.py widerange --optimizers lamb16-absmax,lamb16-block256,bnb-adamw8bit --no-zipf
    """
    names = (parse_list(optimizers, list(widerange.VARIANTS), "--optimizers") if optimizers
             else widerange.default_variants())
    probe_names = parse_list(probes, list(widerange.PROBES), "--probes") if probes.strip() else []
    task = None if no_zipf else widerange.ZipfTask(vocab=zipf_vocab, steps=zipf_steps)
    write_json_output(json_path, widerange.run_study(names, probe_names, task, seed, click.echo))


@cli.command()
@click.option("--optimizers", default="lamb16,lamb16-1pass", show_default=True, help="Comma-separated registry optimizers; ratios are to the first.")
@click.option("--steps", type=click.IntRange(min=1), default=60, show_default=True, help="Steps of the gradient stream.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=POSITIVE, default=0.02, show_default=True)
@seeds_option("3")
@data_dir_option
@download_option
@device_option
def deviation(optimizers, steps, batch_size, lr, seeds, data_dir, download, device):
    """Measure how far each optimizer's weights stray from LAMB16 with float32
    state, on the MNIST CNN's gradients: ||w - w32|| / ||w32 - w0|| after the
    steps, open loop (every optimizer takes the float32-state run's gradients).

    \b
    Example:
      python cli.py deviation --optimizers lamb16,lamb16-1pass,lamb16-seed --seeds 3
    """
    names = parse_list(optimizers, list(registry.OPTIMIZERS), "--optimizers")
    for name in names:
        registry.check_available(name)
    seed_list = parse_seeds(seeds)
    train_data = load_mnist(data_dir, True, studies.device_of(device), download)
    click.echo(f"{steps} steps, batch {batch_size}, lr {lr:g}, weight decay 0.01, seeds {','.join(map(str, seed_list))}")
    click.echo(quantization.deviation_table(train_data, steps, batch_size, lr, seed_list, tuple(names)))


@cli.command()
@click.option("--sizes", default="cnn,10m", show_default=True, help=f"Parameter sets, from: {', '.join(benchmarks.SIZES)}.")
@click.option("--optimizers", default=",".join(benchmarks.DEFAULT_BENCH), show_default=True, help="Optimizers to time (also any registry name).")
@click.option("--steps", type=click.IntRange(min=3), default=30, show_default=True, help="Timed steps per optimizer.")
@click.option("--warmup", type=click.IntRange(min=1), default=5, show_default=True, help="Untimed steps first (compilation).")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True, help="Timed training batches.")
@data_dir_option
@device_option
@click.option("--loops", type=click.Choice(lamb16.native.LOOPS), default=None, help="The CPU kernels' loops to time [default: the widest this processor has].")
@click.option("--steps-only", is_flag=True, help="Time the optimizer steps alone (no training step, no MNIST needed).")
@json_option("figures (written again as each parameter set is timed)")
def bench(sizes, optimizers, steps, warmup, batches, data_dir, device, loops, steps_only, json_path):
    """Time optimizer steps (medians, optimizers interleaved in one process) and
    state bytes per parameter on the MNIST CNN and on ~10 M / ~100 M parameter
    transformer shapes, with ratios to Adam fused, and the host's part of the
    CPU kernels' steps (host ms: their calls doing nothing); then where a
    training step's time goes, and the training throughput of `train` against
    a DataLoader.

    \b
    Under torchrun, the steps alone on parameters sharded over the processes.

    \b
    Examples:
      python cli.py bench --sizes cnn,10m --json bench.json
      python cli.py bench --sizes 10m,100m --loops avx2 --optimizers "adam fused,lamb16,lamb16 1pass"
      torchrun --nproc-per-node 2 cli.py bench --sizes 10m --optimizers "adam fused,lamb,lamb16"
      python cli.py bench --sizes gpt150 --optimizers "adam fused,lamb16 compiled,lamb16 compiled per tensor"
    """
    names = benchmarks.check_available(parse_list(optimizers, benchmarks.choices(), "--optimizers"))
    set_names = parse_list(sizes, benchmarks.SIZES, "--sizes")
    torch_device = studies.device_of(device)
    train_data = None if steps_only else load_mnist(data_dir, True, torch_device, download=None)
    with benchmarks.kernel_loops(loops), parallel.process_group(False, torch_device) as processes:
        save = (lambda report: write_json(json_path, report)) if json_path and processes.is_main else (lambda r: None)
        report = benchmarks.run(set_names, names, steps, warmup, batches, train_data, data_dir, torch_device,
                                click.echo, processes, save)
    if processes.is_main:
        write_json_output(json_path, report)


if __name__ == "__main__":
    cli()
