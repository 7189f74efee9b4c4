"""The end of a training run: the interop self-test of the saved file, the HTML report and the one-screen summary.
Neither the self-test nor the report can fail the run: the LoRA file is already saved."""

import logging
from pathlib import Path

from dataset import CustomDataset
from sdlora.checkpoints import list_checkpoints
from sdlora.healing import heal_lines
from sdlora.judge import JUDGE_DIR, RECOMMENDATION_NAME, summary_line
from sdlora.report import read_json
from sdlora.interop import check_interop, write_interop_report
from sdlora.report import write_report
from sdlora.run_files import DATA_REPORT_NAME, LOSS_LOG_NAME, SAMPLES_DIR
from sdlora.validation import ValidationLog

log = logging.getLogger(__name__)


def interop_self_test(cfg, final_path: Path, accelerator, models) -> None:
    """With cfg.interop_check: reload the final file through diffusers and the A1111 / ComfyUI key rules, against the
    trained UNet (and text encoder) of `models` (a StepModels); write `<file>.interop.json` and say in one line
    whether every consumer gets the trained LoRA. Never fatal: the file is already saved."""
    if not cfg.interop_check:
        return
    unet = accelerator.unwrap_model(models.unet)
    text_encoder = accelerator.unwrap_model(models.text_encoder) if cfg.train_text_encoder else None
    try:
        result = check_interop(final_path, unet, text_encoder)
        written = write_interop_report(final_path, result)
    except Exception as error:  # noqa: BLE001
        log.error(f"interop self-test could not run ({error}); the LoRA file is saved")
        return
    verdict = "ok" if result["ok"] else "PROBLEMS"
    merged = max(result["fused_output_error"].values(), default=float("nan"))
    print(f"interop self-test: {verdict} (diffusers: {result['diffusers']}; unmatched keys: A1111 "
          f"{len(result['a1111_unmatched'])}, ComfyUI {len(result['comfyui_unmatched'])}; max delta error "
          f"{result['max_delta_error']:.1e}; merged by their rules, output error {merged:.1e}) -> {written}")


def write_run_report(output_dir: Path) -> Path | str:
    """report.html and loss.png for the run; a failure here is reported, never fatal (the LoRA is already saved)."""
    try:
        return write_report(output_dir)
    except Exception as error:  # noqa: BLE001
        log.error(f"the HTML report could not be written ({error}); run `python evaluate.py report {output_dir}` to retry")
        return "not written (see the error above)"


def summary_text(output_dir: Path, final_path: Path, step: int, start_step: int, elapsed: float, loss: float,
                 stopping, report_path, dataset: CustomDataset, held_out: int, val_log: ValidationLog) -> str:
    """The one-screen summary printed at the end of a run; `stopping` (a Stopping) has the non-finite steps and the
    rollbacks."""
    steps_done = step - start_step
    heals = "".join(f"\n  healed:      {line}" for line in heal_lines(stopping.heals))
    return (f"\ndone: {step} steps ({steps_done} this run) in {elapsed:.0f} s "
            f"({steps_done / max(elapsed, 1e-9):.2f} steps/s), final loss {loss:.4f}, "
            f"{stopping.nonfinite_total} non-finite step(s) skipped, {len(stopping.heals)} rollback(s){heals}\n"
            f"  LoRA file:   {final_path}\n"
            f"  checkpoints: {len(list_checkpoints(output_dir))} in {output_dir}\n"
            f"  samples:     {output_dir / SAMPLES_DIR}\n"
            f"  loss log:    {output_dir / LOSS_LOG_NAME}\n"
            f"  report:      {report_path}\n"
            f"  data report: {output_dir / DATA_REPORT_NAME} ({len(dataset.examples)} training images, "
            f"{held_out} held out, {len(dataset.skipped)} skipped)" + val_log.summary(output_dir)
            + stopping.early_stop_line() + judge_line(output_dir))


def judge_line(output_dir: Path) -> str:
    """The judge's pick, when the run was judged (judge/recommendation.json)."""
    recommendation = read_json(output_dir / JUDGE_DIR / RECOMMENDATION_NAME)
    return "\n  " + summary_line(recommendation, output_dir) if recommendation else ""
