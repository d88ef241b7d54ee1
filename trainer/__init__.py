"""LoRA Lab's training engine: plain PyTorch components and one loop.

Nothing in this package imports ComfyUI except `trainer.comfy_adapter`, which translates a ComfyUI
MODEL into what the engine needs. Every other module is testable on a toy denoiser.

Modules:
    network    LoRA modules, target selection, attach/detach without mutating the base model
    optimizers optimizer factory (AdamW, AdamW8bit, Lion, Lion8bit, SGD Nesterov, Prodigy)
    schedule   learning-rate schedules (warmup, cosine, restarts, polynomial, min LR)
    precision  fp32 / bf16 / fp16 autocast, dynamic loss scaling, fp8 base weights
    objective  prediction types (eps, v, flow), loss weighting, timestep sampling, noise offset
    loop       the training loop: steps/epochs, accumulation, NaN guard, interrupt, resume
    monitor    loss history, smoothing, validation plan and split
    diagnosis  the verdict on a run, judged against the base model's validation loss
    io         kohya-format safetensors save/load with metadata, atomic writes
    metrics    PSNR and SSIM
    data       training examples, batches by bucket, repeats
    dataset    folder -> images, captions, buckets and augmentation variants
    cache      verified on-disk cache of encoded images
    paths      save names that cannot leave their folder
    report     the training report image and chart points for the browser
    sessions   the one store of sessions that outlive a queue run
    memory     peak-memory estimate before training
    comfy_adapter  the only module that imports ComfyUI
"""
