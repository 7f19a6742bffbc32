"""Builds natasha_ext._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Install torch first, then: pip install --no-build-isolation -e .
Environment: NATASHA_EXT_NO_CUDA=1 skips the CUDA sources; TORCH_CUDA_ARCH_LIST picks the
architectures (default without a visible GPU: 8.0;9.0); MAX_JOBS bounds ninja's parallelism.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

# torch locates the CUDA toolkit from CUDA_HOME or from `which nvcc`; a /usr/local/bin/nvcc
# wrapper script then yields CUDA_HOME=/usr/local and a link without libcudart. Pick a real
# toolkit folder (bin/nvcc and libcudart side by side) unless the user chose one.
def _toolkit_home():
    nvcc = shutil.which("nvcc")
    cands = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + \
        ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        has_rt = any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and has_rt:
            return home
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _toolkit_home():
    os.environ["CUDA_HOME"] = _toolkit_home()


def _cuda_wanted():
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("NATASHA_EXT_NO_CUDA", "0") not in ("", "0"):
        return False, "NATASHA_EXT_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found"
    return True, nvcc


def _cpu_simd_flags():
    """at::vec compiles to its generic (scalar-loop) Vectorized unless a CPU capability is set, as
    ATen does per kernel file. Build the CPU kernels for AVX2+FMA when the build machine has them
    (x86-64 since 2013); NATASHA_EXT_PORTABLE=1 keeps the generic baseline."""
    if os.environ.get("NATASHA_EXT_PORTABLE", "0") not in ("", "0"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if "avx2" in flags and "fma" in flags:
        # -Wno-unknown-pragmas: ATen's AVX2 vec headers carry GPU-style "#pragma unroll"
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-Wno-unknown-pragmas"]
    return []


def _openmp_flags():
    """at::parallel_for is a header template: without -fopenmp (_OPENMP undefined) it compiles to a
    plain serial call, and every CPU kernel ran on one thread whatever torch.set_num_threads said.
    With it, the kernels join torch's own OpenMP pool: the extension's libgomp.so.1 dependency is
    satisfied by the copy torch has already loaded (the same soname), so there is one thread pool.
    Only where torch itself parallelises with OpenMP (its Linux builds)."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _extensions():
    import torch
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    rel = lambda pattern: sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(root, "csrc", "include")]
    openmp = _openmp_flags()
    cxx = ["-O3", "-DNATASHA_PYTHON_MODULE"] + _cpu_simd_flags() + openmp
    # pip's cu13 torch wheels ship the CUDA headers (cusparse.h ...) that torch's headers include.
    nv = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
    if os.path.isdir(nv):
        include_dirs.append(nv)
    use_cuda, why = _cuda_wanted()
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += rel("csrc/cuda/*.cu")
        cxx.append("-DNATASHA_WITH_CUDA")
        ext = cpp_extension.CUDAExtension(
            "natasha_ext._C", sources, include_dirs=include_dirs,
            # no --use_fast_math: approximate sqrt/div/pow and flush-to-zero would make the CUDA
            # kernels drift from the CPU kernels and the reference (AdaHessian, prox, CG divisions)
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "-DNATASHA_WITH_CUDA"]},
            extra_link_args=openmp)
        print(f"natasha_ext: building CPU + CUDA kernels (arch {os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    else:
        print(f"natasha_ext: building CPU kernels only ({why})")
        ext = cpp_extension.CppExtension("natasha_ext._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="natasha_ext",
    version="0.1.0",
    description="Second-order and variance-reduced PyTorch optimizers on fused C++/CUDA kernels",
    packages=find_packages(include=["natasha_ext", "natasha_ext.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["natasha-train=natasha_ext.train:main"]},
)
