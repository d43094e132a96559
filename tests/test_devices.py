"""The accelerator table (longctx.parallel.devices): every figure the planner uses, with its
source, and the lookups by jax's device_kind."""
import pytest

from longctx.parallel import devices


def test_every_planned_accelerator_has_the_figures_a_cost_model_needs():
  planned = [a for a in devices.TABLE if a.planned]
  assert [a.name for a in planned] == [n for n, _ in devices.ACCELERATORS]
  for acc in planned:
    assert acc.memory_bytes and acc.peak_flops and acc.hbm_bytes_per_s, acc.name
    assert acc.link and acc.link_bytes_per_s, acc.name
    # the bandwidths are one direction: under the HBM's, over a PCIe Gen4 x16 link's
    assert 32e9 < acc.link_bytes_per_s < acc.hbm_bytes_per_s, acc.name
  gpus = [a for a in planned if a.name.startswith("H")]
  assert all(a.host_link_bytes_per_s == 64e9 for a in gpus)  # PCIe Gen5 x16, one direction


def test_every_entry_names_its_source_and_its_names_are_unique():
  assert all(a.source for a in devices.TABLE)
  names = [a.name for a in devices.TABLE]
  assert len(set(names)) == len(names)


@pytest.mark.parametrize("kind, flops", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H200", 989.4e12), ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None)])
def test_the_peak_is_found_by_device_kind(kind, flops):
  assert devices.peak_flops(kind) == flops


def test_the_h100_ridge_point_is_its_published_one():
  """989.4 TFLOP/s over 3.35 TB/s: about 295 FLOPs per byte of HBM traffic."""
  h100 = devices.accelerator_of("NVIDIA H100 80GB HBM3")
  assert h100.peak_flops / h100.hbm_bytes_per_s == pytest.approx(295.3, abs=0.1)
