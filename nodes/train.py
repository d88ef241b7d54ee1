"""The Train node: runs the engine on the MODEL the workflow already loaded, in-process."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..trainer import comfy_adapter
from ..trainer.data import EncodedDataset, Example
from ..trainer.io import build_metadata, check_compatible, load_lora, save_lora
from ..trainer.paths import next_free, safe_child_path
from ..trainer.loop import Session, TrainConfig
from ..trainer.network import LoRANetwork, NetworkConfig
from ..trainer.errors import ConfigError, LoRALabError
from ..trainer.objective import LOSS_TYPES, TIMESTEP_SAMPLING, ObjectiveConfig, flux_resolution_shift, validate_for_prediction
from ..trainer.optimizers import OptimizerConfig, check_available
from ..trainer.report import chart_points
from ..trainer.precision import PrecisionConfig, check_device_support, for_device
from ..trainer.monitor import History
from ..trainer.schedule import ScheduleConfig
from ..trainer.schedule import preview as lr_preview
from ..trainer.sessions import STORE, Entry, next_target, node_key
from .common import CATEGORY, DATASET, HISTORY, LORA, NETWORK, OPTIMIZER, PRECISION, SAVE_DTYPES, LoRALabNodeError, TrainedLoRA, TrainingRecord, loras_file, module_fingerprint, user_errors
from .preview import PREVIEW, render_preview, save_temp_image, to_pil

log = logging.getLogger("lora_lab")

MODES = ["continue", "restart"]
NO_START = "(none)"
# "flux_shift" is "shift" with Flux's resolution-dependent value, computed from the dataset.
TIMESTEP_CHOICES = list(TIMESTEP_SAMPLING) + ["flux_shift"]
PROGRESS_EVENT = "lora_lab.progress"
MIN_MESSAGE_INTERVAL_S = 0.25  # bounded rate for live chart messages


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception:  # headless use without a server: nothing to tell
        pass


def _fingerprint(model, dataset: EncodedDataset, **configs) -> dict[str, str]:
    """What a session was built from, part by part, so a restart can say which part changed."""
    parts = {"model": module_fingerprint(model.model.diffusion_model), "dataset": dataset.fingerprint}
    for name, c in configs.items():
        text = json.dumps(c if isinstance(c, dict) else asdict(c), sort_keys=True, default=str)
        parts[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return parts


def _start_file(name: str) -> Path | None:
    """The saved LoRA a new session starts from (start_from_lora), or None."""
    if not name or name == NO_START:
        return None
    return Path(loras_file(name, "start_from_lora"))


def _load_start(network: LoRANetwork, path: Path, family: str) -> None:
    """Copies a saved LoRA's weights (and alphas) into a new network; refuses one of another
    family, rank or target set with the reason, on the start_from_lora input."""
    try:
        weights, _ = load_lora(path)
        check_compatible(weights, set(network.loras), family)
        network.load_kohya(weights)
    except LoRALabError as e:
        raise ConfigError("start_from_lora", f"{path.name}: {e}") from None


def _model_examples(denoiser, dataset: EncodedDataset) -> list[Example]:
    """Raw VAE latents -> the model's latent space; fresh (non-inference) tensors for autograd."""
    out = []
    for ex in dataset.examples:
        latents = [denoiser.latent_in(l[None].clone().float())[0] for l in ex.latents]
        conds = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()} for c in ex.conds]
        out.append(Example(latents, conds, ex.repeats, ex.name, dict(ex.extra)))
    return out


def _image_tokens(dataset: EncodedDataset) -> int:
    """Flux image tokens (2x2 latent patches) of the dataset's most common bucket."""
    counts: dict[int, int] = {}
    for ex in dataset.examples:
        h, w = ex.latents[0].shape[-2:]
        tokens = -(-h // 2) * -(-w // 2)
        counts[tokens] = counts.get(tokens, 0) + ex.repeats
    return max(counts, key=lambda t: (counts[t], t))


def _objective(model, dataset: EncodedDataset, loss_type, min_snr_gamma, noise_offset, timestep_sampling, flow_shift) -> tuple[ObjectiveConfig, str | None]:
    """The engine's objective from the node's inputs; 'flux_shift' becomes 'shift' with the value
    Flux uses at the dataset's resolution. Settings that don't apply to the model are refused here,
    before anything is loaded, naming the input."""
    prediction = comfy_adapter.prediction_type(model.model)
    note = None
    shift = flow_shift
    if timestep_sampling == "flux_shift":
        if prediction != "flow":
            raise ConfigError("timestep_sampling", "flux_shift is for flow models such as Flux; use uniform for SD1.5 and SDXL.")
        tokens = _image_tokens(dataset)
        shift = flux_resolution_shift(tokens)
        timestep_sampling = "shift"
        note = f"flux_shift: shift {shift:.3f} for {tokens} image tokens."
    objective = ObjectiveConfig(loss_type=loss_type, min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, timestep_sampling=timestep_sampling, shift=shift)
    validate_for_prediction(objective, prediction)
    return objective, note


class LoRALabTrain:
    DESCRIPTION = (
        "Trains a LoRA on the connected MODEL, in this ComfyUI process. Queue again to continue training "
        "(mode 'continue'); Cancel keeps everything trained so far. Outputs the MODEL with the LoRA applied."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", LORA, HISTORY)
    RETURN_NAMES = ("model", "lora", "history")
    OUTPUT_TOOLTIPS = ("The input MODEL with the trained LoRA applied (the input MODEL itself is unchanged).", "The trained LoRA: connect Save LoRA, Apply LoRA or Strength Sweep.", "Loss/LR history for the Training Report node.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train on (from your checkpoint loader). It is not modified."}),
                "dataset": (DATASET, {"tooltip": "From the LoRA Lab Dataset node."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 1000000, "tooltip": "Optimizer steps to train in this run. Queue again (mode 'continue') to train this many more."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step. 1-4 on consumer GPUs; images of different aspect ratios are never mixed in a batch."}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 128, "tooltip": "Batches per optimizer step: an effective batch of batch_size x this, without the memory."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Same seed, same settings: the same loss curve, step for step."}),
                "mode": (MODES, {"default": "continue", "tooltip": "continue: keep training the LoRA this node trained before (or finish a cancelled run). restart: start a new LoRA from scratch."}),
                "output_name": ("STRING", {"default": "my_lora", "tooltip": "Name written into the LoRA's metadata (ss_output_name)."}),
            },
            "optional": {
                "network": (NETWORK, {"tooltip": "LoRA Network settings; default rank 16, alpha 16."}),
                "optimizer": (OPTIMIZER, {"tooltip": "Optimizer + schedule; default AdamW, unet_lr 1e-4, cosine, 5% warmup."}),
                "precision": (PRECISION, {"tooltip": "Precision settings; default auto: bf16 on recent GPUs, fp16 on older ones, fp32 on CPU."}),
                "loss_type": (list(LOSS_TYPES), {"default": "mse", "tooltip": "mse is standard; huber/smooth_l1 are more robust to outlier images."}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.5, "tooltip": "Min-SNR weighting (5 is typical for SD1.5/SDXL; 0 = off). Flow models such as Flux don't use it: training Flux with a value > 0 stops with an error, leave it at 0 there."}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Helps very dark/bright images; 0.05-0.1 typical, 0 = off."}),
                "timestep_sampling": (TIMESTEP_CHOICES, {"default": "uniform", "tooltip": "How noise levels are drawn. uniform for SD1.5/SDXL. Flux: sigmoid, logit_normal, shift (uses flow_shift) or flux_shift (Flux's resolution-dependent shift, from the dataset's image size)."}),
                "flow_shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": "Used by timestep_sampling 'shift' only: > 1 trains more at high noise (3.0-3.2 is Flux-dev style), 1 = no shift."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Flux-dev only: the guidance value the model is conditioned on while training. 1.0 is the usual choice for LoRAs; sample with your normal guidance (e.g. 3.5) afterwards. Other models ignore it."}),
                "validation_split": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.45, "step": 0.05, "tooltip": "Share of images held out to measure validation loss at fixed noise: the best sign of over-fitting. 0 = off."}),
                "epochs": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "If > 0, train this many epochs (images x repeats / batch) instead of 'steps'."}),
                "start_from_lora": ([NO_START] + folder_paths.get_filename_list("loras"), {"default": NO_START, "tooltip": "Start a new LoRA from a saved one's weights instead of from zero: pick up after ComfyUI restarted, or fine-tune an earlier LoRA. It must have been trained on this model family with the same rank and targets. The optimizer state, step count and schedule start fresh."}),
                "clip": ("CLIP", {"tooltip": "Only when the Network trains the text encoder (train_text_encoder): the CLIP from your checkpoint loader, the one the Dataset node used."}),
                "continue_from": (LORA, {"tooltip": "Chain Train nodes: continue the session that trained this LoRA (train 200, preview, train 200 more)."}),
                "preview": (PREVIEW, {"tooltip": "From a LoRA Lab Preview node: what to sample while training."}),
                "preview_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Sample the preview every this many steps and at the end, shown on this node as it trains. 0 = off."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Also save the LoRA every this many steps into the loras folder as <output_name>-step000500.safetensors, to pick an earlier one later. 0 = off."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # every queue trains (continue) or restarts: never served from cache

    @classmethod
    def VALIDATE_INPUTS(cls, output_name):
        try:  # it also names the files save_every writes into the loras folder
            safe_child_path(folder_paths.get_folder_paths("loras")[0], output_name, field="output_name")
        except ConfigError as e:
            return str(e)
        return True

    @user_errors
    def train(self, model, dataset, steps, batch_size, gradient_accumulation, seed, mode, output_name, network=None, optimizer=None, precision=None, loss_type="mse", min_snr_gamma=0.0, noise_offset=0.0, timestep_sampling="uniform", validation_split=0.0, epochs=0, continue_from=None, flow_shift=3.0, guidance=1.0, preview=None, preview_every=0, save_every=0, clip=None, start_from_lora=NO_START, unique_id=None):
        device = comfy.model_management.get_torch_device()
        network = network or NetworkConfig()
        opt_config, sched_config = optimizer or (OptimizerConfig(), ScheduleConfig(name="cosine", warmup_ratio=0.05))
        precision = for_device(precision or PrecisionConfig(mixed_precision="auto"), device)
        objective, objective_note = _objective(model, dataset, loss_type, min_snr_gamma, noise_offset, timestep_sampling, flow_shift)
        train_config = TrainConfig(steps=steps if not epochs else 0, epochs=epochs, batch_size=batch_size, gradient_accumulation=gradient_accumulation, seed=seed, validation_split=validation_split)
        problem = check_available(opt_config.name, device)
        if problem:
            raise LoRALabNodeError(f"optimizer: {problem}")
        warning = check_device_support(precision, device)
        if network.train_text_encoder and clip is None:
            raise ConfigError("clip", "the Network trains the text encoder (train_text_encoder is on): connect the CLIP from your checkpoint loader to the Train node's clip input, or turn train_text_encoder off.")

        key = continue_from.session_key if continue_from is not None else node_key(unique_id)
        fingerprint = _fingerprint(
            model, dataset, network=network, optimizer=opt_config, schedule=sched_config, precision=precision, objective=objective,
            training=train_config.__class__(**{**asdict(train_config), "steps": 1, "epochs": 0}), guidance={"guidance": guidance},
        )
        if network.train_text_encoder:
            fingerprint["text_encoder"] = module_fingerprint(clip.cond_stage_model)
        start = _start_file(start_from_lora)
        if start is not None:
            fingerprint["start_from_lora"] = f"{start_from_lora}:{start.stat().st_size}:{start.stat().st_mtime_ns}"
        notes = [n for n in (warning, objective_note) if n]
        with torch.inference_mode(False):
            entry = STORE.get(key)
            if continue_from is not None and entry is None:
                raise LoRALabNodeError("continue_from: that training session is gone (ComfyUI restarted or the node was reset); queue the first Train node again.")
            if entry is None or (continue_from is None and (mode == "restart" or entry.fingerprint != fingerprint)):
                if entry is not None and mode == "continue":
                    changed = [k for k in fingerprint if entry.fingerprint.get(k) != fingerprint[k]]
                    notes.append(f"Started a new LoRA: the {', '.join(changed)} changed since the last run (set mode to 'continue' with the same inputs to keep training).")
                STORE.release(key)
                entry = Entry(self._new_session(model, dataset, network, opt_config, sched_config, precision, objective, train_config, guidance, clip, start), fingerprint, 0, time.time())
                STORE.put(key, entry)
            session = entry.session
            text_encoder = session.denoiser.text_encoder
            if session.denoiser.model is not model.model or (text_encoder is not None and text_encoder.clip.cond_stage_model is not clip.cond_stage_model):
                # The same checkpoint, loaded again by ComfyUI (the fingerprint matched): train on
                # the instance the workflow holds now instead of keeping the old one alive.
                denoiser, targets = self._targets(model, session.network.config, guidance, clip)
                session.network.rebind(targets)
                session.denoiser = denoiser
            until = next_target(entry, session.total_steps if epochs else steps)
            entry.target_step = until
            session.denoiser.load()
            with comfy_adapter.fp8_base(session.denoiser.model.diffusion_model, session.precision.fp8_base):
                notes.append(self._check_memory(session, device))
                saved: list[str] = []

                def save_checkpoint(step: int) -> None:
                    snapshot = self._result(session, entry, key, output_name, opt_config, sched_config, precision)
                    path = next_free(safe_child_path(folder_paths.get_folder_paths("loras")[0], f"{output_name}-step{step:06d}", field="output_name"))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_lora(path, snapshot.weights, dict(snapshot.metadata, ss_output_name=path.stem), dtype=SAVE_DTYPES[precision.save_dtype])
                    saved.append(str(path))

                previews = self._run(session, until, unique_id, model, preview if preview_every else None, preview_every, save_every, save_checkpoint)
            lora = self._result(session, entry, key, output_name, opt_config, sched_config, precision)
            out_model = comfy_adapter.apply_lora(model, None, lora.weights, 1.0)[0]
        diagnosis = session.diagnosis()
        record = TrainingRecord(
            History.from_dict(session.history.to_dict()),
            diagnosis,
            lr_preview(session.schedule, session.base_lrs[0], until),
            f"{output_name} ({session.denoiser.family}, rank {network.rank}, alpha {network.alpha:g})",
        )
        ui = {"lora_lab": [{"history": chart_points(session.history), "diagnosis": {"verdict": diagnosis.verdict, "headline": diagnosis.headline, "advice": list(diagnosis.advice)}, "notes": notes, "step": session.step, "total": until}]}
        if previews:
            ui["images"] = previews
        if saved:
            ui["lora_lab"][0]["saved"] = saved
        return {"ui": ui, "result": (out_model, lora, record)}

    @staticmethod
    def _targets(model, network: NetworkConfig, guidance: float, clip=None):
        """The denoiser over a clone of MODEL and the layers to adapt (the CLIP's too when the
        text encoder trains)."""
        text_encoder = comfy_adapter.ComfyTextEncoder(clip) if network.train_text_encoder else None
        denoiser = comfy_adapter.ComfyDenoiser(model.clone(), guidance=guidance, text_encoder=text_encoder)
        targets = comfy_adapter.unet_targets(denoiser.model, network)
        if text_encoder is not None:
            targets += comfy_adapter.text_encoder_targets(clip, denoiser.family, network)
        return denoiser, targets

    @classmethod
    def _new_session(cls, model, dataset, network, opt_config, sched_config, precision, objective, train_config, guidance=1.0, clip=None, start=None) -> Session:
        denoiser, targets = cls._targets(model, network, guidance, clip)
        with torch.random.fork_rng(devices=[]):  # the LoRA's initial weights follow the seed too
            torch.manual_seed(train_config.seed)
            lora_network = LoRANetwork(targets, network)
        if start is not None:
            _load_start(lora_network, start, denoiser.family)
        examples = _model_examples(denoiser, dataset)
        return Session(denoiser, examples, lora_network, optimizer=opt_config, schedule=sched_config, precision=precision, objective=objective, train=train_config)

    @staticmethod
    def _check_memory(session: Session, device) -> str:
        """Estimates the run's peak memory (once per session), logs it, and stops with the ways to
        fit when it exceeds what is free on the device. Returns the line for the node's notes."""
        estimate = getattr(session, "memory_estimate", None)
        if estimate is None:
            estimate = comfy_adapter.estimate_memory(session.denoiser, session.network, session.examples, session.optimizer_config.name, session.train.batch_size, session.precision)
            session.memory_estimate = estimate
        text = estimate.to_text()
        log.info("LoRA Lab: %s", text)
        # Already in memory: the loaded weights (and, training on CPU, the encoded dataset and fp8's copies).
        resident = comfy_adapter.resident_bytes(session.denoiser.model.diffusion_model) + estimate.parts.get("dataset", 0) + estimate.parts.get("fp8 originals", 0)
        estimate.check_fits(comfy_adapter.free_memory_bytes(device), resident, str(device))
        return text[0].upper() + text[1:] + "."

    @staticmethod
    def _run(session: Session, until: int, unique_id, model=None, preview=None, preview_every: int = 0, save_every: int = 0, save=None) -> list[dict]:
        pbar = comfy.utils.ProgressBar(until)
        pbar.update_absolute(session.step, until)
        last_sent = [0.0]
        previews: list[dict] = []

        def on_step(info):
            now = time.monotonic()
            if now - last_sent[0] >= MIN_MESSAGE_INTERVAL_S or info.step == until:
                last_sent[0] = now
                h = session.history
                _send(PROGRESS_EVENT, {"node": str(unique_id), "step": info.step, "total": until, "loss": info.loss, "smoothed": h.smoothed[-1] if h.smoothed else None, "lr": info.lr, "eta_s": info.eta_seconds, "val_step": h.val_step[-1:], "val_loss": h.val_loss[-1:]})
            if save_every and info.step % save_every == 0:
                save(info.step)
            shown = None
            if preview is not None and (info.step % preview_every == 0 or info.step == until):
                image = render_preview(preview, model, session.network)
                previews.append(save_temp_image(image, f"lora_lab_preview_{unique_id}_{info.step:06d}"))
                shown = ("PNG", to_pil(image), 512)
            pbar.update_absolute(info.step, until, shown)  # raises ComfyUI's interrupt on Cancel; state is kept

        if session.precision.gradient_checkpointing:
            with comfy_adapter.gradient_checkpointing(session.denoiser.model.diffusion_model):
                session.run(until_step=until, callback=on_step)
        else:
            session.run(until_step=until, callback=on_step)
        return previews

    @staticmethod
    def _result(session: Session, entry: Entry, key: str, output_name: str, opt: OptimizerConfig, sched: ScheduleConfig, precision: PrecisionConfig) -> TrainedLoRA:
        weights = session.network.to_kohya(torch.float32)
        net = session.network.config
        metadata = build_metadata(
            base_model=session.denoiser.family,
            output_name=output_name,
            rank=net.rank,
            alpha=net.alpha,
            conv_rank=net.conv_rank,
            conv_alpha=net.conv_alpha if net.conv_rank else 0,
            learning_rate=opt.unet_lr,
            text_encoder_lr=opt.text_encoder_lr if net.train_text_encoder else None,
            steps=session.step,
            epochs=session.epoch_of(max(session.step - 1, 0)) + 1,
            started_at=entry.started_at,
            optimizer=opt.name,
            scheduler=sched.name,
            network_args=net.network_args(),
            extra={"lora_lab_seed": str(session.train.seed), "lora_lab_loss_type": session.objective.loss_type, "lora_lab_prediction": session.denoiser.prediction},
        )
        return TrainedLoRA(weights, metadata, session.denoiser.family, precision.save_dtype, key, output_name)
