"""Build of the compiled extension ``mvfast._C``.

The C++ CPU kernels are always built. The CUDA kernels are built when nvcc and a CUDA build of torch are
present, of the same major CUDA version (which PyTorch requires); ``FORCE_CUDA=1`` builds them even when
detection says no, ``MVFAST_NO_CUDA=1`` skips them.
``TORCH_CUDA_ARCH_LIST`` defaults to the archs that matter (8.0 8.6 8.9 9.0) when no GPU is visible.
CUDA headers that the system toolkit lacks (cusparse.h, cublas_v2.h, ... which torch's ATen/cuda headers
include) are taken from the nvidia-* wheels that pip installs with torch.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def log(msg):
    print(f"[mvfast build] {msg}", file=sys.stderr, flush=True)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_ok(path):
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    )


def find_cuda_home():
    """The toolkit nvcc belongs to. `which nvcc` may be a wrapper script outside the toolkit, so ask
    nvcc where it lives instead of guessing from its path."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _toolkit_ok(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _toolkit_ok(guess):
            return guess
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if m and _toolkit_ok(os.path.dirname(m.group(1))):
                return os.path.dirname(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
    for guess in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _toolkit_ok(guess):
            return guess
    return None


def wheel_cuda_include_dirs():
    """Include folders of the nvidia-* wheels (nvidia/cu13/include, nvidia/cusparse/include, ...)."""
    dirs = []
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return dirs
    for base in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isdir(inc):
                dirs.append(inc)
    return dirs


def toolkit_version(cuda_home):
    """The CUDA version of the toolkit at ``cuda_home`` as (major, minor), from ``nvcc --version``, or None
    where nvcc does not say."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def missing_headers(cuda_home):
    needed = ["cusparse.h", "cublas_v2.h", "cusolverDn.h", "curand.h"]
    return [h for h in needed if not os.path.isfile(os.path.join(cuda_home, "include", h))]


def cpu_flags():
    # -fopenmp: at::parallel_for is a header template over OpenMP; without the flag it runs serially. At run
    # time libgomp resolves to the copy torch has already loaded.
    flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and not _truthy("MVFAST_PORTABLE"):
        # at::vec picks its implementation from CPU_CAPABILITY_* macros; AVX2+FMA is on every x86 CPU of
        # the last decade. MVFAST_PORTABLE=1 builds the generic version instead.
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            info = ""
        if " avx2" in info and " fma" in info:
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def build_extensions():
    cuda_home = None
    if _truthy("MVFAST_NO_CUDA"):
        log("MVFAST_NO_CUDA=1: building the CPU kernels only")
        with_cuda = False
    else:
        cuda_home = find_cuda_home()
        if cuda_home:
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
            os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    if not _truthy("MVFAST_NO_CUDA"):
        torch_has_cuda = torch.version.cuda is not None
        with_cuda = _truthy("FORCE_CUDA") or (torch_has_cuda and cuda_home is not None)
        why = "torch is a CPU build" if not torch_has_cuda else "no CUDA toolkit (nvcc) found"
        if with_cuda and not _truthy("FORCE_CUDA"):
            # torch.utils.cpp_extension refuses a toolkit of another major CUDA version than torch's (a
            # CUDA 13 nvcc beside a torch built with CUDA 12): build what can be built instead of failing.
            have, built = toolkit_version(cuda_home), torch.version.cuda
            if have and int(built.split(".")[0]) != have[0]:
                with_cuda = False
                why = (
                    f"the toolkit at {cuda_home} is CUDA {have[0]}.{have[1]} and torch was built with CUDA "
                    f"{built}; PyTorch builds CUDA extensions only with a toolkit of its own major version: "
                    f"point CUDA_HOME at a CUDA {built.split('.')[0]}.x toolkit for the CUDA kernels (the "
                    "Triton kernels run on a GPU without them)"
                )
        if not with_cuda:
            log(f"building the CPU kernels only ({why}; FORCE_CUDA=1 forces the CUDA kernels)")

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = []
    cxx = cpu_flags()
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("MVFAST_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        if cuda_home and missing_headers(cuda_home):
            wheel_dirs = wheel_cuda_include_dirs()
            if wheel_dirs:
                log(
                    f"{cuda_home} lacks {', '.join(missing_headers(cuda_home))}; "
                    "using headers of the nvidia wheels"
                )
            # Searched after the toolkit's -I folder, so its own headers win and the wheels only fill in
            # what it lacks (-idirafter for the host compiler, -isystem for nvcc, which has no -idirafter).
            for d in wheel_dirs:
                cxx += ["-idirafter", d]
                nvcc += ["-isystem", d]
        extra["nvcc"] = nvcc
        define_macros.append(
            (
                "MVFAST_CUDA_ARCHS",
                '"' + os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ",").replace(";", ",") + '"',
            )
        )
        define_macros.append(("MVFAST_CUDA_VERSION", f'"{torch.version.cuda}"'))
        log(
            f"building CPU and CUDA kernels: CUDA_HOME={cuda_home}, torch CUDA {torch.version.cuda}, "
            f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
    log("sources: " + " ".join(sources))
    ext = ext_cls(
        name="mvfast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
