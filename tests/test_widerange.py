"""The wide-range study (experiments/widerange.py, `cli.py widerange`): its
probes tell a scaling that loses a tensor's small values from one that keeps
them, and the Zipf model reports by frequency band."""

import functools
import json
import math

import torch
from click.testing import CliRunner

import cli
from experiments import widerange
from experiments.widerange import Probe, ZipfTask


def ratios(name: str, probe: Probe, seed: int = 1) -> dict[str, float]:
    parent = widerange.VARIANTS[name].parent
    groups = probe.groups(widerange.drawn_scales(probe, seed))
    moved = widerange.displacements(widerange.VARIANTS[name].make, probe, seed)
    return widerange.median_ratios(moved, widerange.displacements(widerange.PARENTS[parent], probe, seed), groups)


def test_rows_far_below_the_largest_lose_their_updates_under_one_scale_and_keep_them_under_block_scales():
    """Rows 8 decades apart: one scale per tensor flushes the moments of rows
    more than about 1e-5 below the largest; a scale per block of a row keeps
    every decade near the float32 parent's update."""
    probe = widerange.PROBES["rows"]
    absmax, block = ratios("lamb16-absmax", probe), ratios("lamb16-block256", probe)
    print(f"\n  absmax {absmax}\n  block  {block}")
    assert all(0.8 <= r <= 1.3 for r in block.values()), block
    assert absmax["1e-0..1e-1"] > 0.8
    assert max(absmax["1e-5..1e-6"], absmax["1e-6..1e-7"], absmax["1e-7..1e-8"]) < 0.2


def test_a_falling_half_freezes_under_one_scale_and_follows_under_block_scales():
    """Half a tensor's gradients fall 10x while the other half holds one
    scale: its second moment cannot come down (a 0.1% step is below half of
    e5m2's grid), so its updates shrink; with its own blocks' scales it follows."""
    probe = Probe("falling", (64, 64), 1500, 1e-4, 200, lambda shape, gen: torch.ones(shape),
                  functools.partial(widerange.falling_half, fall_steps=1000), widerange.halves)
    absmax, block = ratios("lamb16-absmax", probe), ratios("lamb16-block256", probe)
    print(f"\n  absmax {absmax}\n  block  {block}")
    assert absmax["falling half"] < 0.6
    assert all(0.8 <= r <= 1.25 for r in block.values()), block


def test_the_groups_of_the_probes_cover_every_element_once():
    for probe in widerange.PROBES.values():
        groups = probe.groups(widerange.drawn_scales(probe, 1))
        assert torch.equal(sum(mask.int() for mask in groups.values()), torch.ones(probe.shape, dtype=torch.int))


def test_the_zipf_model_reports_each_frequency_band_open_and_closed_loop():
    task = ZipfTask(vocab=300, width=16, batch=128, steps=30)
    assert list(widerange.bands(task)) == ["top 10", "10-100", "100-300"]
    names = ["lamb16-absmax", "lamb16-block256"]
    open_rows = widerange.zipf_open_loop(names, task, seed=1)
    assert [(r["optimizer"], r["layer"]) for r in open_rows] == [
        (n, layer) for n in names for layer in ("embedding.weight", "output.weight")]
    for row in open_rows:  # every band's rows moved, near the parent's step
        assert set(row["ratios"]) == set(widerange.bands(task)) and all(0.5 < r < 2 for r in row["ratios"].values())
    losses = widerange.zipf_losses(names, task, seed=1)
    assert [r["optimizer"] for r in losses] == ["lamb16-float32", *names]
    for row in losses:  # trained: below the loss of a uniform guess
        assert all(0 < loss < math.log(task.vocab) for loss in row["losses"].values())
    assert "(+" in widerange.loss_table(losses) or "(-" in widerange.loss_table(losses)


def test_cli_widerange_writes_its_tables_and_json(tmp_path):
    out = tmp_path / "wide.json"
    result = CliRunner().invoke(cli.cli, ["widerange", "--optimizers", "lamb16-absmax,lamb16-block32", "--probes",
                                          "rows", "--zipf-vocab", "120", "--zipf-steps", "5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "## probe rows" in result.output and "| lamb16-block32 | lamb16-float32 |" in result.output
    report = json.loads(out.read_text())
    assert [row["optimizer"] for row in report["probes"]["rows"]] == ["lamb16-absmax", "lamb16-block32"]
    assert report["zipf"]["task"]["vocab"] == 120


def test_cli_widerange_names_an_unknown_variant():
    result = CliRunner().invoke(cli.cli, ["widerange", "--optimizers", "lamb16-block7", "--no-zipf"])
    assert result.exit_code == 2 and "unknown lamb16-block7" in result.output
