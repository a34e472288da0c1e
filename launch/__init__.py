"""Launchers: local multi-process (local.py), TPU pod (tpu_pod.sh), SLURM GPU (slurm_gpu.sbatch); sweeps and reports."""
