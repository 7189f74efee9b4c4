"""What the loop trains on: the images with the run's data settings, the frozen inputs encoded once (latents,
caption embeddings), and the batches of each epoch in a seeded order a resume replays."""

import math
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from dataset import BucketBatchSampler, CustomDataset, WeightedItems, caption_token_counts
from sdlora.caching import EncodedDataset, encode_latent_cache, encode_text_cache, latent_mask_cache
from sdlora.kohya_dataset import has_class_subsets, read_dataset_config
from sdlora.pivotal import add_train_token, spell_out
from sdlora.run_files import LATENT_CACHE_DIR
from sdlora.validation import ValidationSet


def make_dataset(cfg, path: str, strict: bool = False, cache_path: Path | None = None,
                 with_classes: bool = False) -> CustomDataset:
    """The images and captions at `path` (and, `with_classes`, the class images and the pictures' loss masks: the
    training set; its folders from dataset_config when set) with the run's data settings: the one place config
    names map to CustomDataset's parameters."""
    subsets = read_dataset_config(cfg.dataset_config, cfg) if cfg.dataset_config and with_classes else None
    return CustomDataset(
        path, resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
        caption_extension=cfg.caption_extension, fallback_caption=cfg.fallback_caption, seed=cfg.seed,
        strict=strict, cache_path=cache_path, buckets=cfg.aspect_ratio_buckets, bucket_upscale=cfg.bucket_upscale,
        trigger_phrase=cfg.trigger_phrase, shuffle_tags=cfg.shuffle_tags, keep_tags=cfg.keep_tags,
        caption_dropout=cfg.caption_dropout, class_data_path=cfg.class_data_path if with_classes else None,
        class_prompt=cfg.class_prompt, masked_loss=cfg.masked_loss and with_classes, mask_path=cfg.mask_path,
        subsets=subsets)


def micro_batches_per_step(cfg) -> int:
    """Micro-batches in one optimizer step: with class images (class_data_path, or a dataset config's is_reg
    subsets) each instance batch comes with a class batch."""
    classes = cfg.class_data_path or has_class_subsets(cfg.dataset_config)
    return cfg.gradient_accumulation_steps * (2 if classes else 1)


def encode_frozen_inputs(cfg, dataset: CustomDataset, validation_data: CustomDataset | None, tokenizer, text_encoder,
                         vae, weight_dtype, accelerator):
    """(the items the loop draws, the held-out ValidationSet or None, the VAE, the text encoder): what is frozen,
    encoded once on the accelerator's device, the VAE and text encoder then None when their work is all cached (so
    their memory is freed before the UNet loads). Says why a cache is off when the settings rule it out, and how
    many captions CLIP cuts short. A train_token is added to the tokenizer and text encoder first; captions holding
    it are encoded at each step (its embedding trains), so the text encoder stays."""
    token = add_train_token(cfg, tokenizer, text_encoder)
    if accelerator.is_main_process:
        report_long_captions(dataset, tokenizer)
        report_trigger_and_image_count(cfg, dataset, tokenizer)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    latents = embeddings = masks = None
    say = accelerator.print
    if cfg.cache_latents and not cfg.center_crop:
        say("latent cache off: random crops make every step's crop new, so images are encoded at each step")
    elif cfg.cache_latents:
        disk_dir = Path(cfg.output_dir) / LATENT_CACHE_DIR if cfg.cache_latents_to_disk else None
        variants = len(dataset.examples) * (2 if cfg.random_flip else 1)
        shard = (accelerator.process_index, accelerator.num_processes)
        with tqdm(total=math.ceil(variants / shard[1]), desc="caching latents",
                  disable=not accelerator.is_main_process) as progress:
            latents = encode_latent_cache(dataset, vae, disk_dir, f"{cfg.pretrained_model_name_or_path}|{weight_dtype}",
                                          progress, shard)
        latents = gather_parts(latents, accelerator)
        masks = latent_mask_cache(dataset, latents) if dataset.masked else None
    captions = dataset.possible_captions()
    if cfg.cache_text_embeddings and cfg.train_text_encoder:
        say("text-embedding cache off: the text encoder is training, so captions are encoded at each step")
    elif cfg.cache_text_embeddings and captions is None:
        say("text-embedding cache off: tag shuffling makes new captions at each step")
    elif cfg.cache_text_embeddings:
        if token is not None:
            captions = {c for c in captions if cfg.train_token not in tokenizer.tokenize(c)}
            say(f"text-embedding cache: captions holding {cfg.train_token!r} are encoded at each step (its "
                f"embedding trains); {len(captions)} other caption(s) cached")
        embeddings = encode_text_cache(sorted(captions), tokenizer, text_encoder,
                                       (accelerator.process_index, accelerator.num_processes))
        embeddings = gather_parts(embeddings, accelerator) or None
    validation = None if validation_data is None else ValidationSet(
        validation_data, vae, tokenizer, text_encoder, vae.config.scaling_factor,
        cfg.train_text_encoder or token is not None)
    train_data = EncodedDataset(dataset, latents, embeddings, masks) if latents or embeddings else dataset
    return (train_data, validation, None if latents is not None else vae,
            None if embeddings is not None and token is None else text_encoder)


def report_long_captions(dataset: CustomDataset, tokenizer: CLIPTokenizer) -> None:
    """CLIP reads 77 tokens: say once how many captions lose their end, rather than silently dropping it."""
    lengths, long = caption_token_counts([e.caption for e in dataset.examples], tokenizer)
    if long:
        print(f"{long} caption(s) longer than the {tokenizer.model_max_length}-token CLIP limit are truncated "
              f"(longest: {max(lengths)} tokens)")


MIN_SUBJECT_IMAGES = 3


def report_trigger_and_image_count(cfg, dataset: CustomDataset, tokenizer: CLIPTokenizer) -> None:
    """Say at start what weakens a subject LoRA before hours go into it: a trigger word the tokenizer cuts into
    pieces (the concept is then spread over pieces other words share, instead of bound to one rare token), and fewer
    than MIN_SUBJECT_IMAGES training pictures (the LoRA learns those pictures rather than the subject)."""
    for word in cfg.trigger_phrase.split():
        pieces = tokenizer.tokenize(word)
        if len(pieces) > 1:
            print(f"note: trigger_phrase word {word!r} is {len(pieces)} tokens to this model's tokenizer "
                  f"({' '.join(pieces)}); a word that is one rare token (e.g. 'sks') binds the concept to one "
                  f"embedding of its own")
    pictures = sum(not example.prior for example in dataset.examples)
    if pictures < MIN_SUBJECT_IMAGES:
        print(f"warning: {pictures} training image(s) in {cfg.dataset_path}: with fewer than {MIN_SUBJECT_IMAGES} "
              f"pictures of a subject the LoRA learns those pictures (their pose, background and framing) rather "
              f"than the subject; add pictures, or watch the samples for copies of them")


def gather_parts(part: dict, accelerator) -> dict:
    """Each process encoded a share of a cache; every process gets the whole of it."""
    if accelerator.num_processes == 1:
        return part
    whole = {}
    for piece in gather_object([part]):
        whole.update(piece)
    return whole


def make_collate(tokenizer):
    """Stack what the items carry: cached latent distributions or pixels, cached text embeddings (when every item
    has one) or token ids (multi-vector tokens spelled out, see pivotal.spell_out)."""
    def collate(items: list[dict]) -> dict:
        batch = {"index": torch.tensor([item["index"] for item in items]),
                 "loss_weight": torch.tensor([item["loss_weight"] for item in items], dtype=torch.float32)}
        for key in ("pixel_values", "latent_mean", "latent_std", "mask", "text_embedding"):
            if all(key in item for item in items):
                batch[key] = torch.stack([item[key] for item in items])
        if "text_embedding" not in batch:
            batch["input_ids"] = tokenizer([spell_out(item["caption"], tokenizer) for item in items],
                                           padding="max_length", truncation=True,
                                           max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return batch
    return collate


def make_dataloader(cfg, dataset: CustomDataset, train_data, tokenizer, processes: int):
    """(the bucket batch sampler, the dataloader over `train_data` it drives)."""
    sampler = BucketBatchSampler([dataset.sizes[example] for example in dataset.order], cfg.train_batch_size,
                                 cfg.seed, processes, [dataset.examples[example].prior for example in dataset.order],
                                 cfg.prior_loss_weight)
    dataloader = torch.utils.data.DataLoader(WeightedItems(train_data), batch_sampler=sampler,
                                             collate_fn=make_collate(tokenizer),
                                             num_workers=cfg.dataloader_num_workers)
    return sampler, dataloader


def epoch_batches(epoch: int, step: int, steps_per_epoch: int, cfg, accelerator, sampler, train_data, dataloader):
    """The micro-batches of `epoch` still to run: its order and augmentations set, and on resume the micro-batches
    the checkpoint already trained on skipped."""
    sampler.begin_epoch(epoch)
    train_data.begin_epoch(epoch)
    skip = (step % steps_per_epoch) * micro_batches_per_step(cfg)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
