"""LoRA Lab's training engine: plain PyTorch components and one loop.

Nothing in this package imports ComfyUI except `trainer.comfy_adapter`, which translates a ComfyUI
MODEL into what the engine needs. Every other module is testable on a toy denoiser.

Modules:
    adapters   LoRA, LoKr, LoHa and DoRA in bypass form, with ComfyUI's file layouts
    network    LoRA modules, target selection, attach/detach without mutating the base model
    optimizers optimizer factory (AdamW, AdamW8bit, Lion, Lion8bit, SGD Nesterov, Prodigy)
    schedule   learning-rate schedules (warmup, cosine, restarts, polynomial, min LR)
    spec       TrainingSpec: every setting of a run, one frozen value kept by the session
    recipe     how a run is put together, once: start_session, train, lora_file
    resume     resumable training states on disk (safetensors, no pickle)
    precision  fp32 / bf16 / fp16 / auto precision per device, autocast
    optim_step fp16 loss scaling, gradient clipping, finiteness check
    fp8        fp8 storage of the frozen base weights
    objective  prediction types (eps, v, flow), loss weighting, timestep sampling, noise offset
    loop       the training loop: steps/epochs, accumulation, NaN guard, interrupt, resume
    monitor    loss history, smoothing, validation plan and split
    diagnosis  the verdict on a run, judged against the base model's validation loss
    io         kohya-format safetensors save/load with metadata, atomic writes
    metrics    PSNR and SSIM
    data       training examples, batches by bucket, repeats
    images     scanning a folder and decoding its images (formats, animated files, large images)
    dataset    folder -> images, captions, buckets and augmentation variants
    fingerprint  cheap identity of every tensor of a model / VAE / text encoder
    cache      verified on-disk cache of encoded images
    paths      save names that cannot leave their folder
    report     the training report image and chart points for the browser
    sessions   the one store of sessions that outlive a queue run
    memory     peak-memory estimate before training
    comfy_adapter  the only module that imports ComfyUI
"""
