"""Environment defaults of the command-line programs, set before TensorFlow, jax and libtpu load.

Each CLI module (`train`, `evaluate`, `select`, `infer`, `export`, `aot`) calls `quiet_environment()` first thing
when it runs as a program, before its other imports: TensorFlow reads its logging variables when it is imported,
libtpu its topology variables when jax first initialises its backends. `run_setup.quiet_frameworks()` (called at the
start of each `main`) calls it again and adds the logging filters. Imports nothing heavy; importing it changes
nothing.

What it quiets, and what it leaves alone:
- TensorFlow's and XLA's C++ INFO lines ("oneDNN custom operations are on ...", "This TensorFlow binary is optimized
  to use available CPU instructions ...", once per library): `TF_CPP_MIN_LOG_LEVEL=1` keeps their warnings and
  errors (`import jax` sets the same default, too late when TensorFlow was imported first);
  `TF_ENABLE_ONEDNN_OPTS=0` (TensorFlow only writes TensorBoard event files here).
- libtpu on a host without a TPU chip (`jax[tpu]` installed on a CPU or GPU machine, as `aot` needs): it prints
  "could not determine TPU accelerator type", "Logging before InitGoogle()" and an `E0000 ... unexpected worker
  hostname` block before jax falls back to the CPU. Told it is one host (`TPU_HOST_BOUNDS=1,1,1`,
  `TPU_WORKER_HOSTNAMES=localhost`), which a chipless host is, it fails quietly; `aot`'s compile-only topologies
  are the same. Never set on a host that may have a TPU chip, nor when any libtpu topology variable is already set.
- Every value is a default: a variable already in the environment wins. `JAX_PLATFORMS` is never touched.
"""

from __future__ import annotations

import glob
import os

# Google's PCI vendor id, and its devices that are not TPU chips (gVNIC network, NVMe disks of GCE VMs). Any other
# Google device counts as a TPU chip: a generation newer than this list must never be taken for "no TPU".
_GOOGLE_PCI_VENDOR = "0x1ae0"
_GOOGLE_NON_TPU_DEVICES = {"0x0042", "0x001f"}

# libtpu's topology variables: when the user (or a TPU VM image) set one, libtpu's environment is theirs. (Not
# TPU_SKIP_MDS_QUERY: jax sets it itself when it finds no chip.)
_LIBTPU_TOPOLOGY_VARS = (
  "TPU_HOST_BOUNDS",
  "TPU_WORKER_HOSTNAMES",
  "TPU_WORKER_ID",
  "TPU_ACCELERATOR_TYPE",
  "TPU_CHIPS_PER_HOST_BOUNDS",
  "TPU_CHIPS_PER_PROCESS_BOUNDS",
  "TPU_PROCESS_BOUNDS",
  "TPU_PROCESS_ADDRESSES",
  "JAX_FORCE_TPU_INIT",
)


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def may_have_tpu() -> bool:
  """Whether this host may have a TPU chip: a Google PCI device other than a known NIC or disk (what jax checks,
  conservatively), or a TPU device node (`/dev/accel*`, `/dev/vfio`)."""
  if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    if _read(vendor) == _GOOGLE_PCI_VENDOR:
      if _read(os.path.join(os.path.dirname(vendor), "device")) not in _GOOGLE_NON_TPU_DEVICES:
        return True
  return False


def quiet_environment() -> None:
  """Sets the defaults described in the module docstring (idempotent)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not any(name in os.environ for name in _LIBTPU_TOPOLOGY_VARS) and not may_have_tpu():
    os.environ["TPU_HOST_BOUNDS"] = "1,1,1"
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
