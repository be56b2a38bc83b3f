"""Training pipeline for ALGNet: the paper's recipe as YAML configs, one entry point.

    python -m train train/configs/synthetic_motion_s.yaml            # train (resumes with --resume)
    torchrun --nproc_per_node 8 -m train train/configs/gopro_algnet.yaml
    python -m train.export runs/NAME/best.pt OUT_DIR                 # save_pretrained + model card
    algnet publish OUT_DIR --repo-id USER/NAME --dry-run             # Hub upload (algnet_core.publish)
    python -m train.benchmark levin OUT_DIR                          # deterministic benchmarks

Modules: ``config`` (YAML -> typed sections), ``losses`` (Eq. 1-4), ``kernels`` (blur kernels), ``data``
(datasets, synthetic blur, resumable sampler), ``engine`` (training loop), ``export``, ``benchmark``.
"""
