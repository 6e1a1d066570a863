"""memkd: memory-guided knowledge distillation (MemKD, ICCV 2023) for unsupervised anomaly detection."""
__version__ = "0.1.0"
