"""Whether the ranks a run asks for can be reached, checked before anything is built.

A run of ``trainer.num_nodes > 1`` needs a launcher on every node (SLURM's ``srun``, ``torchrun``, MPI, LSF's
``jsrun``, or ``MASTER_ADDR`` + ``NODE_RANK`` set by hand on each node). Started on one machine without any, its
ranks would wait in ``init_process_group`` for the others until the store's timeout (30 minutes), saying nothing.
:func:`check_world_size` stops such a run at once, with the one-node command.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

# What each launcher sets in every process it starts, and the variable that holds the launched world size.
LAUNCHERS = {
    "SLURM (srun)": (("SLURM_NTASKS", "SLURM_PROCID"), "SLURM_NTASKS"),
    "torchrun / torchelastic": (("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"), "WORLD_SIZE"),
    "Open MPI (mpirun)": (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_SIZE"),
    "MPICH / Intel MPI (PMI)": (("PMI_SIZE", "PMI_RANK"), "PMI_SIZE"),
    "LSF (jsrun)": (("LSB_JOBID", "JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_LOCAL_RANK"), "JSM_NAMESPACE_SIZE"),
    "by hand (MASTER_ADDR, NODE_RANK on each node)": (("MASTER_ADDR", "NODE_RANK"), None),
}


def detect_launcher(environ: dict[str, str] | None = None) -> tuple[str, int | None] | None:
    """The launcher that started this process, and the world size it launched (``None`` if it does not say), or
    ``None`` when no launcher's variables are set. SLURM jobs named ``bash`` or ``interactive`` are interactive
    allocations (no ``srun``), as Lightning treats them."""
    environ = os.environ if environ is None else environ
    for name, (required, size_key) in LAUNCHERS.items():
        if not all(key in environ for key in required):
            continue
        if name.startswith("SLURM") and environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
            continue
        size = environ.get(size_key) if size_key else None
        return name, int(size) if size and size.isdigit() else None
    return None


def devices_per_node(trainer: DictConfig) -> int | None:
    """Processes per node that ``trainer.devices`` asks for, or ``None`` when the node decides (``auto``, ``-1``)."""
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": device indices
        return len([index for index in devices.split(",") if index.strip()])
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    return None  # "auto" or -1: as many as the node has


def check_world_size(cfg: DictConfig, environ: dict[str, str] | None = None) -> None:
    """Stop a run whose ``trainer.num_nodes`` cannot be reached: several nodes and no launcher that starts them, or a
    launcher that started another number of processes than ``num_nodes x devices``. One node needs nothing."""
    trainer = cfg.get("trainer") or {}
    nodes = int(trainer.get("num_nodes", 1) or 1)
    devices = devices_per_node(trainer)
    launcher = detect_launcher(environ)
    wanted = nodes * devices if devices is not None else None
    if launcher is not None:
        name, launched = launcher
        if launched is not None and wanted is not None and launched != wanted and (nodes > 1 or launched > 1):
            raise ValueError(
                f"trainer.num_nodes={nodes} x trainer.devices={devices} asks for {wanted} processes, but {name} "
                f"started {launched}; make them agree (e.g. sbatch --nodes={nodes} --ntasks-per-node={devices}, or "
                f"set trainer.num_nodes and trainer.devices to what the job has)"
            )
        return
    if nodes <= 1:
        return
    raise ValueError(one_node_message(cfg, nodes, devices))


def one_node_message(cfg: DictConfig, nodes: int, devices: int | None) -> str:
    """Why a multi-node run cannot start here, and what the one-node run changes (global batch, scaled lr)."""
    per_device = cfg.get("batch_size")
    devices_text = devices if devices is not None else "all the node's"
    text = (
        f"trainer.num_nodes={nodes} asks for {nodes} nodes, but no launcher started the other {nodes - 1}: none of "
        f"SLURM (srun), torchrun, MPI or LSF is running this process, and MASTER_ADDR + NODE_RANK are not set. Its "
        f"ranks would wait for the missing ones for 30 minutes and then fail. On this node alone: add "
        f"trainer.num_nodes=1"
    )
    if per_device is not None and devices is not None:
        reference = cfg.get("lr_reference_batch")
        lr = OmegaConf.select(cfg, "optimizer.lr")
        full, one = per_device * devices * nodes, per_device * devices
        text += f" (global batch {one} = batch_size {per_device} x {devices} devices, instead of {full}"
        if reference and lr is not None:
            text += f"; the lr scales with it: optimizer.lr {lr} x {one}/{reference} = {lr * one / reference:g}"
            text += f" instead of {lr * full / reference:g}"
        text += (
            f"; trainer.accumulate_grad_batches={nodes} keeps the lr and the batch per update, though each step's "
            f"InfoNCE then sees {one} targets)"
        )
    else:
        text += f" ({devices_text} devices; the global batch and the scaled lr shrink by {nodes}x)"
    return text + (
        f". On a SLURM cluster: sbatch/srun with --nodes={nodes} --ntasks-per-node={devices_text}, or "
        "cluster=slurm with --multirun (submitit)."
    )
