"""Resource use of the compiled CUDA kernels for sm_90, read from the build with cuobjdump (no GPU needed;
issue 12, section 1): every kernel of the three ops is in the sm_90 code, and none of them uses local
memory (register spills or local arrays). CI builds the CUDA kernels on every run, so this runs there;
it skips, saying why, where the extension was built without CUDA or no cuobjdump is found.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mvfast import info

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"

# The kernels on the ops' hot paths (all of them), by qualified name without template arguments. Listed
# rather than taken from the build, so that a kernel renamed or dropped from the build fails here instead
# of leaving the check silently.
HOT = [
    "netvlad::softmax_kernel",
    "netvlad::residual_kernel",
    "netvlad::sample_norm_kernel",
    "netvlad::normalize_kernel",
    "netvlad::norm_stats_kernel",
    "netvlad::norm_backward_kernel",
    "netvlad::assign_backward_kernel",
    "netvlad::centroid_grad_kernel",
    "attention_pool::forward_kernel",
    "attention_pool::combine_kernel",
    "attention_pool::weights_kernel",
    "attention_pool::backward_kernel",
    "conv3d_bn_relu::stats_kernel",
    "conv3d_bn_relu::stats_combine_kernel",
    "conv3d_bn_relu::apply_kernel",
    "conv3d_bn_relu::apply_same_kernel",
    "conv3d_bn_relu::bwd_reduce_kernel",
    "conv3d_bn_relu::bwd_apply_kernel",
    "conv3d_bn_relu::bwd_apply_same_kernel",
]


def _base(kernel: str) -> str:
    return kernel.split("<", 1)[0].removeprefix("mvfast::")


@pytest.fixture(scope="module")
def resources():
    why = info.cuda_resources_unavailable(ARCH)
    if why:
        pytest.skip(why)
    return info.cuda_resources(ARCH)


def test_every_hot_kernel_is_in_the_build(resources):
    built = {_base(r["kernel"]) for r in resources}
    missing = [k for k in HOT if k not in built]
    assert not missing, f"not in the {ARCH} code of mvfast._C: {missing} (built: {sorted(built)})"


def test_hot_kernels_do_not_spill(resources):
    hot = [r for r in resources if _base(r["kernel"]) in HOT]
    assert hot
    for r in hot:
        assert r["registers"] > 0, f"{r['kernel']}: no register count read"
    spills = [r for r in hot if r["local"] > 0 or r["local_stores"] > 0]
    assert not spills, f"kernels using local memory at {ARCH}:\n" + "\n".join(
        f"  {r['kernel']}: LOCAL {r['local']} B/thread, {r['local_stores']} STL, {r['local_loads']} LDL, "
        f"{r['registers']} registers, stack {r['stack']} B"
        for r in spills
    )


@pytest.mark.parametrize(
    "mangled, name",
    [
        (
            "_ZN6mvfast7netvlad12_GLOBAL__N_114softmax_kernelIfEEvPT_PKS3_PKbll",
            "mvfast::netvlad::softmax_kernel<float>",
        ),
        (
            "_ZN6mvfast14conv3d_bn_relu55_GLOBAL__N__9a0c5d1e_17_conv3d_bn_relu_cu_6f7a4b2e_219317bwd_reduce_kernel"
            "ILb1ELb0EN3c108BFloat16EfEEvPKT1_S6_lllPKT2_S9_S9_S9_bPS7_SA_",
            "mvfast::conv3d_bn_relu::bwd_reduce_kernel<true, false, c10::BFloat16, float>",
        ),
        ("_Z3foov", None),
    ],
)
def test_kernel_names_without_cxxfilt(mangled, name):
    assert info.kernel_name(mangled) == name


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="no c++filt to compare with")
def test_kernel_names_agree_with_cxxfilt(resources):
    """The report's own reading of the names (used where c++filt is missing) gives c++filt's names."""
    for r in resources:
        assert info.kernel_name(r["mangled"]) == r["kernel"]


def test_info_command_prints_the_table():
    p = subprocess.run(
        [sys.executable, "-m", "mvfast.info", "--cuda-resources", "--arch", ARCH],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    why = info.cuda_resources_unavailable(ARCH)
    if why:
        assert f"CUDA kernel resources for {ARCH}: unavailable: {why}" in p.stdout
    else:
        assert p.stdout.startswith(f"CUDA kernel resources for {ARCH}")
        for k in HOT:
            assert f"mvfast::{k}<" in p.stdout
