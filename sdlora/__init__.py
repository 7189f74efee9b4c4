"""What the scripts at the top of the repository import; nothing here is run by itself.

One module a job: `settings` (config parsing and checks), `caching` (latent and text caches), `checkpoints`
(resumable state), `lora_file` (the LoRA file format), `adapter_weights` (LoHa, LoKr and DoRA in a file),
`adapters` (the LoHa and LoKr layers), `interop` (loading the file as other clients do), `sampling` (sample
prompts and images), `report` (the run's HTML report), `class_images` (prior preservation),
`optimizers`, `ema`, `files` (atomic writes, hashes, image listing), `tiny_world` and `tiny_model` (the shipped
toy world and tiny test models), and the CPU speed helpers `attention` and `cpu_kernels`.

train_lora.py's phases, in the order its `main` runs them: `preflight` (minute-0 checks), `loading` (models,
LoRA injection), `network_weights` (starting from a LoRA file), `training_data` (datasets, caches, batches),
`training_step` (noise, loss, update), `stopping` (signals, non-finite steps), `resuming` (checkpoints of a
run), `training_log`, `validation` (held-out loss), `training_samples`, `run_files` (the run folder's file names
and files) and `summary` (the end of a run).
"""
