"""The Train node: a form over the engine's recipe (trainer/recipe.py), on the MODEL the workflow loaded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import comfy.utils
import folder_paths

from ..trainer import comfy_adapter, recipe
from ..trainer.errors import ConfigError, LoRALabError
from ..trainer.io import load_lora
from ..trainer.monitor import History
from ..trainer.paths import safe_child_path
from ..trainer.network import NetworkConfig
from ..trainer.optimizers import OptimizerConfig
from ..trainer.precision import PrecisionConfig
from ..trainer.schedule import ScheduleConfig
from ..trainer.objective import LOSS_TYPES, TIMESTEP_SAMPLING, ObjectiveConfig
from ..trainer.report import chart_points
from ..trainer.resume import STATE_SUFFIX, changed_parts, load_state, save_state
from ..trainer.sessions import STORE, Entry, next_target, node_key
from ..trainer.spec import TrainConfig, TrainingSpec
from ..trainer.fingerprint import encoder_fingerprint, patcher_fingerprint
from .common import CATEGORY, DATASET, HISTORY, LORA, NETWORK, OPTIMIZER, PRECISION, TrainedLoRA, TrainingRecord, default_of, loras_file, save_into_loras, user_errors
from .preview import PREVIEW, control_examples, render_preview, save_temp_image, to_pil

log = logging.getLogger("lora_lab")

MODES = ["continue", "restart"]
NO_START = "(none)"
TIMESTEP_CHOICES = list(TIMESTEP_SAMPLING) + [recipe.FLUX_SHIFT]
PROGRESS_EVENT = "lora_lab.progress"
MIN_MESSAGE_INTERVAL_S = 0.25  # bounded rate for live chart messages
SAVE_EVERY_TAIL = "-step99999999"  # the longest suffix save_every adds to output_name
STATES_DIR = "lora_lab_states"  # in ComfyUI's output folder: resumable states, never among the LoRAs


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception:  # headless use without a server: nothing to tell
        pass


def states_folder() -> Path:
    return Path(folder_paths.get_output_directory()) / STATES_DIR


def state_names() -> list[str]:
    folder = states_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(STATE_SUFFIX) and not p.name.startswith("."))


def _picked(name) -> bool:
    return bool(name) and name != NO_START


def training_spec(model, dataset, steps, batch_size, gradient_accumulation, seed, network=None, optimizer=None, precision=None, loss_type="mse", min_snr_gamma=0.0, noise_offset=0.0, timestep_sampling="uniform", validation_split=0.0, epochs=0, flow_shift=recipe.FLOW_SHIFT, guidance=1.0, expert="none", expert_boundary=recipe.EXPERT_BOUNDARY) -> tuple[TrainingSpec, list[str]]:
    """The run's spec from the Train node's inputs (unconnected settings: their nodes' defaults),
    and notes for the user. The headless multi-process command builds its spec here too."""
    opt, sched = optimizer or (OptimizerConfig(), ScheduleConfig())  # the Optimizer node's defaults
    objective, objective_note = recipe.resolve_objective(comfy_adapter.prediction_type(model.model), dataset.examples, timestep_sampling, flow_shift, expert, expert_boundary, loss_type=loss_type, min_snr_gamma=min_snr_gamma, noise_offset=noise_offset)
    train_config = TrainConfig(steps=steps if not epochs else 0, epochs=epochs, batch_size=batch_size, gradient_accumulation=gradient_accumulation, seed=seed, validation_split=validation_split)
    spec = TrainingSpec(network=network or NetworkConfig(), optimizer=opt, schedule=sched, precision=precision or PrecisionConfig(), objective=objective, train=train_config, guidance=guidance)
    return spec, [n for n in (objective_note,) if n]


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
        t, o = default_of(TrainConfig), default_of(ObjectiveConfig)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train on (from your checkpoint loader). It is not modified."}),
                "dataset": (DATASET, {"tooltip": "From the LoRA Lab Dataset node."}),
                "steps": ("INT", {"default": t["steps"], "min": 1, "max": 1000000, "tooltip": "Optimizer steps to train in this run. Queue again (mode 'continue') to train this many more: the LR schedule then runs a new cycle over those steps (warm restart)."}),
                "batch_size": ("INT", {"default": t["batch_size"], "min": 1, "max": 64, "tooltip": "Images per step. 1-4 on consumer GPUs; images of different aspect ratios are never mixed in a batch."}),
                "gradient_accumulation": ("INT", {"default": t["gradient_accumulation"], "min": 1, "max": 128, "tooltip": "Batches per optimizer step: an effective batch of batch_size x this, without the memory."}),
                "seed": ("INT", {"default": t["seed"], "min": 0, "max": 0xFFFFFFFF, "tooltip": "Same seed, same settings: the same loss curve, step for step."}),
                "mode": (MODES, {"default": "continue", "tooltip": "continue: keep training the LoRA this node trained before (or finish a cancelled run). restart: start a new LoRA from scratch."}),
                "output_name": ("STRING", {"default": "my_lora", "tooltip": "Name written into the LoRA's metadata (ss_output_name), and of the files save_every writes."}),
            },
            "optional": {
                "network": (NETWORK, {"tooltip": "LoRA Network settings; unconnected = the Network node's defaults."}),
                "optimizer": (OPTIMIZER, {"tooltip": "Optimizer + schedule; unconnected = the Optimizer node's defaults."}),
                "precision": (PRECISION, {"tooltip": "Precision settings; unconnected = the Precision node's defaults (auto: bf16 on recent GPUs, fp16 on older ones, fp32 on CPU; gradient checkpointing on)."}),
                "loss_type": (list(LOSS_TYPES), {"default": o["loss_type"], "tooltip": "mse is standard; huber/smooth_l1 are more robust to outlier images."}),
                "min_snr_gamma": ("FLOAT", {"default": o["min_snr_gamma"], "min": 0.0, "max": 20.0, "step": 0.5, "tooltip": "Min-SNR weighting (5 is typical for SD1.5/SDXL; 0 = off). Flow models such as Flux don't use it: training Flux with a value > 0 stops with an error, leave it at 0 there."}),
                "noise_offset": ("FLOAT", {"default": o["noise_offset"], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Helps very dark/bright images; 0.05-0.1 typical, 0 = off."}),
                "timestep_sampling": (TIMESTEP_CHOICES, {"default": o["timestep_sampling"], "tooltip": "How noise levels are drawn. uniform for SD1.5/SDXL. Flux: sigmoid, logit_normal, shift (uses flow_shift) or flux_shift (Flux's resolution-dependent shift, from the dataset's image size)."}),
                "flow_shift": ("FLOAT", {"default": recipe.FLOW_SHIFT, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": "Used by timestep_sampling 'shift' only: > 1 trains more at high noise (3.0-3.2 is Flux-dev style), 1 = no shift."}),
                "guidance": ("FLOAT", {"default": default_of(TrainingSpec)["guidance"], "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Flux-dev only: the guidance value the model is conditioned on while training. 1.0 is the usual choice for LoRAs; sample with your normal guidance (e.g. 3.5) afterwards. Other models ignore it."}),
                "expert": (list(recipe.EXPERTS), {"default": "none", "tooltip": "Wan 2.2 A14B only: it is two models, each trained apart with its own LoRA. Load the high-noise model file and pick high_noise (it trains on noise levels t >= expert_boundary), then the low-noise file with low_noise (t < expert_boundary); apply each LoRA to its own model. none = the whole noise range (every other model)."}),
                "expert_boundary": ("FLOAT", {"default": recipe.EXPERT_BOUNDARY, "min": 0.01, "max": 0.99, "step": 0.005, "tooltip": "Where the Wan 2.2 A14B experts split the noise range: 0.875 for text-to-video, 0.9 for image-to-video (Wan2.2's own configs)."}),
                "validation_split": ("FLOAT", {"default": t["validation_split"], "min": 0.0, "max": 0.45, "step": 0.05, "tooltip": "Share of images held out to measure validation loss at fixed noise: the best sign of over-fitting. 0 = off."}),
                "epochs": ("INT", {"default": t["epochs"], "min": 0, "max": 100000, "tooltip": "If > 0, train this many epochs (images x repeats / batch) instead of 'steps'."}),
                "start_from_lora": ([NO_START] + folder_paths.get_filename_list("loras"), {"default": NO_START, "tooltip": "Start a new LoRA from a saved one's weights instead of from zero (fine-tune an earlier LoRA). It must have been trained on this model family with the same rank and targets. The optimizer state, step count and schedule start fresh; to pick up a run exactly, use resume_from_state."}),
                "resume_from_state": ([NO_START] + state_names(), {"default": NO_START, "tooltip": "Pick up a run exactly where a save_every checkpoint left it, after ComfyUI restarted: weights, optimizer, step, schedule and loss history, the same loss curve as if it had never stopped. The state must come from this model and dataset with the same settings (steps aside); otherwise the node says which input differs. States are in output/lora_lab_states."}),
                "clip": ("CLIP", {"tooltip": "Only when the Network trains the text encoder (train_text_encoder): the CLIP from your checkpoint loader, the one the Dataset node used."}),
                "continue_from": (LORA, {"tooltip": "Chain Train nodes: continue the session that trained this LoRA (train 200, preview, train 200 more), with its settings. The MODEL and dataset connected here must be the ones it trained on."}),
                "preview": (PREVIEW, {"tooltip": "From a LoRA Lab Preview node: what to sample while training."}),
                "preview_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Sample the preview every this many steps and at the end, shown on this node as it trains. 0 = off."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Also save the LoRA every this many steps into the loras folder as <output_name>-step000500.safetensors, to pick an earlier one later, with a resumable state in output/lora_lab_states (see resume_from_state). 0 = off."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # every queue trains (continue) or restarts: never served from cache

    @classmethod
    def VALIDATE_INPUTS(cls, output_name, start_from_lora=NO_START, resume_from_state=NO_START):
        if _picked(start_from_lora) and _picked(resume_from_state):
            return "resume_from_state: pick either start_from_lora (weights only) or resume_from_state (the whole run), not both."
        try:  # it also names the files save_every writes into the loras folder
            safe_child_path(folder_paths.get_folder_paths("loras")[0], output_name, field="output_name", tail=SAVE_EVERY_TAIL)
        except ConfigError as e:
            return str(e)
        return True

    @user_errors
    def train(self, model, dataset, steps, batch_size, gradient_accumulation, seed, mode, output_name, network=None, optimizer=None, precision=None, loss_type="mse", min_snr_gamma=0.0, noise_offset=0.0, timestep_sampling="uniform", validation_split=0.0, epochs=0, continue_from=None, flow_shift=recipe.FLOW_SHIFT, guidance=1.0, expert="none", expert_boundary=recipe.EXPERT_BOUNDARY, preview=None, preview_every=0, save_every=0, clip=None, start_from_lora=NO_START, resume_from_state=NO_START, unique_id=None):
        spec, notes = training_spec(model, dataset, steps, batch_size, gradient_accumulation, seed, network, optimizer, precision, loss_type, min_snr_gamma, noise_offset, timestep_sampling, validation_split, epochs, flow_shift, guidance, expert, expert_boundary)
        key = continue_from.session_key if continue_from is not None else node_key(unique_id)
        with torch.inference_mode(False):
            entry = self._entry(key, model, dataset, spec, clip, mode, continue_from, start_from_lora, resume_from_state, notes)
            session = entry.session
            until = entry.target_step = next_target(entry, session.total_steps if epochs else steps)
            previews, saved = [], []
            on_step = self._on_step(session, entry, until, unique_id, model, preview if preview_every else None, preview_every, save_every, output_name, previews, saved)
            notes += recipe.train(session, until, on_step)
            weights, metadata = recipe.lora_file(session, output_name)
            out_model = comfy_adapter.apply_lora(model, None, weights, 1.0)[0]
        return self._show(session, until, weights, metadata, key, output_name, out_model, notes, previews, saved)

    @staticmethod
    def _fingerprint(model, dataset, spec: TrainingSpec, clip, start_from_lora) -> dict[str, str]:
        """What a session is built from, part by part, so a new start can say which part changed."""
        parts = {"model": patcher_fingerprint(model), "dataset": dataset.fingerprint, **spec.parts()}
        if spec.network.train_text_encoder and clip is not None:
            parts["text_encoder"] = encoder_fingerprint(clip, "cond_stage_model")
        if _picked(start_from_lora):
            st = Path(loras_file(start_from_lora, "start_from_lora")).stat()
            parts["start_from_lora"] = f"{start_from_lora}:{st.st_size}:{st.st_mtime_ns}"
        return parts

    def _entry(self, key, model, dataset, spec, clip, mode, continue_from, start_from_lora, resume_from_state, notes) -> Entry:
        """The session this queue trains: this node's (or the chained one's), continued when its
        inputs are unchanged, else a new one — from zero, a saved LoRA or a resumable state."""
        fingerprint = self._fingerprint(model, dataset, spec, clip, start_from_lora)
        if _picked(resume_from_state):
            fingerprint["resume_from_state"] = resume_from_state
        entry = STORE.get(key)
        if continue_from is not None:
            if entry is None:
                raise ConfigError("continue_from", "that training session is gone (ComfyUI restarted or the node was reset); queue the first Train node again.")
            changed = [p for p in ("model", "dataset") if entry.fingerprint.get(p) != fingerprint[p]]
            if changed:
                raise ConfigError("continue_from", f"the {' and '.join(changed)} connected to this Train node {'is' if len(changed) == 1 else 'are'} not what the chained session trained on; connect the same MODEL and dataset as the first Train node.")
        elif entry is None or mode == "restart" or entry.fingerprint != fingerprint:
            if entry is not None and mode == "continue":
                changed = changed_parts(entry.fingerprint, fingerprint)
                notes.append(f"Started a new LoRA: the {', '.join(changed)} changed since the last run (set mode to 'continue' with the same inputs to keep training).")
            STORE.release(key)
            entry = self._new_entry(model, dataset, spec, clip, start_from_lora, resume_from_state, fingerprint, notes)
            STORE.put(key, entry)
        if not entry.session.denoiser.same_model(model, clip):
            # The same checkpoint loaded again by ComfyUI (the fingerprint matched): train on the
            # instance the workflow holds now instead of keeping the old one alive.
            entry.session.rebind(*comfy_adapter.training_targets(model, entry.session.spec.network, entry.session.spec.guidance, clip))
        return entry

    @staticmethod
    def _new_entry(model, dataset, spec, clip, start_from_lora, resume_from_state, fingerprint, notes) -> Entry:
        denoiser, targets = comfy_adapter.training_targets(model, spec.network, spec.guidance, clip)
        control = None
        if dataset.control_conds:  # once per session: the base model's own images of the control prompts
            with comfy_adapter.dataset_fits(denoiser.profile.label):
                control, note = control_examples(model, dataset, spec.train.seed)
            control = recipe.model_examples(denoiser, control)
            notes.append(note)
        try:
            start = load_lora(loras_file(start_from_lora, "start_from_lora"))[0] if _picked(start_from_lora) else None
            session = recipe.start_session(denoiser, targets, recipe.model_examples(denoiser, dataset.examples), spec, start, control=control)
        except LoRALabError as e:  # a saved LoRA that can't start this run: the file's name and the reason
            field = getattr(e, "field", None)
            if not _picked(start_from_lora) or field not in (None, "start_from_lora"):
                raise
            raise ConfigError("start_from_lora", f"{start_from_lora}: {e.message if field else e}") from None
        if not _picked(resume_from_state):
            return Entry(session, fingerprint, 0)
        try:
            state = load_state(states_folder() / resume_from_state)
        except Exception as e:  # noqa: BLE001 - a user's file: the reason, on the input that picked it
            raise ConfigError("resume_from_state", str(e)) from None
        mine = {k: v for k, v in fingerprint.items() if k != "resume_from_state"}
        changed = changed_parts(state.fingerprint, mine)
        if changed:
            raise ConfigError("resume_from_state", f"{resume_from_state} was trained with another {', '.join(changed)}; connect the model, dataset and settings it was made with, or start a new LoRA (resume_from_state '{NO_START}').")
        session.load_state_dict(state.tensors, state.metadata)
        return Entry(session, fingerprint, state.target_step)

    @staticmethod
    def _on_step(session, entry, until, unique_id, model, preview, preview_every, save_every, output_name, previews, saved):
        """Progress bar, live chart, previews and save_every checkpoints after each step."""
        pbar = comfy.utils.ProgressBar(until)
        pbar.update_absolute(session.step, until)
        last_sent = [0.0]

        def on_step(info):
            now = time.monotonic()
            if now - last_sent[0] >= MIN_MESSAGE_INTERVAL_S or info.step == until:
                last_sent[0] = now
                h = session.history
                _send(PROGRESS_EVENT, {"node": str(unique_id), "step": info.step, "total": until, "loss": info.loss, "smoothed": h.smoothed[-1] if h.smoothed else None, "lr": info.lr, "eta_s": info.eta_seconds, "val_step": h.val_step[-1:], "val_loss": h.val_loss[-1:], "base_val_loss": h.base_val_loss,
                                      "bleed_step": h.bleed_step[-1:], "bleed_loss": h.bleed_loss[-1:], "base_bleed_loss": h.base_bleed_loss})
            if save_every and info.step % save_every == 0:
                weights, metadata = recipe.lora_file(session, output_name)
                path = save_into_loras(f"{output_name}-step{info.step:06d}", weights, metadata, session.precision.save_dtype, field="output_name")
                save_state(states_folder() / (path.stem + STATE_SUFFIX), session, entry.fingerprint, entry.target_step)
                saved.append(str(path))
            shown = None
            if preview is not None and (info.step % preview_every == 0 or info.step == until):
                image = render_preview(preview, model, session.network)
                previews.append(save_temp_image(image, f"lora_lab_preview_{unique_id}_{info.step:06d}"))
                shown = ("PNG", to_pil(image), 512)
            pbar.update_absolute(info.step, until, shown)  # raises ComfyUI's interrupt on Cancel; state is kept

        return on_step

    @staticmethod
    def _show(session, until, weights, metadata, key, output_name, out_model, notes, previews, saved):
        spec, diagnosis = session.spec, session.diagnosis()
        lora = TrainedLoRA(weights, metadata, session.denoiser.profile.key, spec.precision.save_dtype, key, output_name)
        title = f"{output_name} ({session.denoiser.profile.label}, rank {spec.network.rank}, alpha {spec.network.alpha:g})"
        record = TrainingRecord(History.from_dict(session.history.to_dict()), diagnosis, session.lr_plan(until), title)
        info = {"history": chart_points(session.history), "diagnosis": {"verdict": diagnosis.verdict, "headline": diagnosis.headline, "advice": list(diagnosis.advice)}, "notes": notes, "step": session.step, "total": until}
        if saved:
            info["saved"] = saved
        ui = {"lora_lab": [info]}
        if previews:
            ui["images"] = previews
        return {"ui": ui, "result": (out_model, lora, record)}

