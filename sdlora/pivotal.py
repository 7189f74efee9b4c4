"""Pivotal tuning: a token's text embedding trained beside the LoRA (cloneofsimo's PTI, diffusers' advanced script
`--train_text_encoder_ti`, OneTrainer's additional embeddings), so the subject gets a word of its own as well as
the weights that draw it.

The token is added to the tokenizer with diffusers' multi-vector convention (TextualInversionLoaderMixin
`_extend_tokens_and_embeddings`, `maybe_convert_prompt`): a token of n vectors is the added tokens `tok`, `tok_1`,
..., `tok_{n-1}`, and a prompt naming `tok` is spelled out as all of them. The text encoder's token embedding is
wrapped (TokenEmbedding), not resized: the frozen table stays as it was and the n trained vectors (fp32) stand in at
the added tokens' positions. The vectors are saved inside the LoRA file as `bundle_emb.<token>.string_to_param.*`
(lora_file.bundle_tensors: what AUTOMATIC1111 registers as an embedding when the LoRA loads) and as a
textual-inversion file `{token: [n, width]}` that diffusers' `load_textual_inversion` reads.
"""

import re
from pathlib import Path

import torch
from torch import nn

from sdlora.lora_file import write_safetensors
from sdlora.settings import ConfigError

_TOKEN_NAME = re.compile(r"^[^\s.,/\\:]+$")  # a file-key and prompt-safe name: A1111 splits bundle keys at "."


def placeholder_tokens(token: str, vectors: int) -> list[str]:
    """The added tokens of `token` with `vectors` vectors: `tok`, `tok_1`, ... (diffusers' spelling)."""
    return [token] + [f"{token}_{index}" for index in range(1, vectors)]


def spell_out(text: str, tokenizer) -> str:
    """`text` with every multi-vector token written as all its added tokens ("sks" -> "sks sks_1 sks_2"), as
    diffusers' pipelines do before tokenizing; unchanged when the tokenizer has no multi-vector tokens."""
    added = tokenizer.added_tokens_encoder
    for token in added:
        if f"{token}_1" in added and token in text:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            text = text.replace(token, " ".join(placeholder_tokens(token, count)))
    return text


def check_train_token(cfg, tokenizer, captions: list[str]) -> None:
    """Refuse at start a token that would not train what the user meant: a name other tools cannot key, a word the
    tokenizer cuts into pieces (without train_token_new), an initialiser that is not one token, captions that never
    name it."""
    token = cfg.train_token
    if not _TOKEN_NAME.match(token):
        raise ConfigError(f"--train_token {token!r}: one word without spaces, dots, commas, slashes or colons "
                          f"(A1111 reads it from the LoRA file's bundle_emb.<token>. keys), e.g. sks")
    pieces = tokenizer.tokenize(token)
    if len(pieces) > 1 and not cfg.train_token_new:
        raise ConfigError(f"--train_token {token!r} is {len(pieces)} tokens to this model's tokenizer "
                          f"({' '.join(pieces)}): set --train_token_new true to add it as a new token (then give "
                          "--train_token_init), or choose a word that is one token, e.g. sks")
    if cfg.train_token_new and not cfg.train_token_init:
        raise ConfigError("--train_token_new: a new token has no embedding of its own to start from; name a word "
                          "close to the subject with --train_token_init, e.g. dog")
    if cfg.train_token_init and len(tokenizer.tokenize(cfg.train_token_init)) != 1:
        raise ConfigError(f"--train_token_init {cfg.train_token_init!r} is "
                          f"{len(tokenizer.tokenize(cfg.train_token_init))} tokens to this model's tokenizer "
                          f"({' '.join(tokenizer.tokenize(cfg.train_token_init))}); choose one word that is one "
                          f"token, e.g. dog")
    if cfg.train_token_vectors < 1:
        raise ConfigError(f"--train_token_vectors {cfg.train_token_vectors}: at least 1 (1 to 4 is usual)")
    if cfg.train_token_lr <= 0:
        raise ConfigError(f"--train_token_lr {cfg.train_token_lr}: must be positive, e.g. 5e-4")
    if not any(token in caption for caption in captions + [cfg.trigger_phrase]):
        raise ConfigError(f"--train_token {token!r} is in no caption and not in trigger_phrase, so it would never "
                          f"train; put it in the captions or set --trigger_phrase \"{token}\"")


class TokenEmbedding(nn.Module):
    """The text encoder's token embedding with `vectors` (n x D, fp32, trainable) standing in at `token_ids`.

    forward(input_ids B x L) -> B x L x D in the base table's dtype: base(input_ids) where input_ids is no added
    token, vectors[j] where it is token_ids[j]. The base table is left untouched (and frozen)."""

    def __init__(self, base: nn.Embedding, token: str, token_ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.token = token
        self.register_buffer("token_ids", torch.tensor(token_ids, device=base.weight.device), persistent=False)
        self.vectors = nn.Parameter(vectors.detach().to(base.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # what code reading `token_embedding.weight` (dtype, device) expects
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = input_ids[..., None] == self.token_ids  # B x L x n
        added = slots.any(dim=-1)
        embedded = self.base(torch.where(added, torch.zeros_like(input_ids), input_ids))
        own = slots.to(self.vectors.dtype) @ self.vectors
        return torch.where(added[..., None], own.to(embedded.dtype), embedded)


def add_train_token(cfg, tokenizer, text_encoder) -> TokenEmbedding | None:
    """With train_token set: its added tokens in `tokenizer`, and the text encoder's token embedding wrapped in a
    TokenEmbedding whose vectors start, each, as train_token_init's embedding (or the token's own, for a word the
    tokenizer already has as one token). Returns the TokenEmbedding, or None when train_token is empty."""
    if not cfg.train_token:
        return None
    base = text_encoder.get_input_embeddings()
    start_word = cfg.train_token_init or cfg.train_token
    start_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(start_word))[0]  # before the token is added
    placeholders = placeholder_tokens(cfg.train_token, cfg.train_token_vectors)
    tokenizer.add_tokens(placeholders)
    token_ids = tokenizer.convert_tokens_to_ids(placeholders)
    start = base.weight[start_id].detach().float()
    embedding = TokenEmbedding(base, cfg.train_token, token_ids, start.expand(len(placeholders), -1))
    text_encoder.set_input_embeddings(embedding)
    return embedding


def trained_token(text_encoder) -> TokenEmbedding | None:
    """The TokenEmbedding inside a text encoder (add_train_token put it there), or None (also for no text encoder:
    one released after caching)."""
    if text_encoder is None:
        return None
    embedding = text_encoder.get_input_embeddings()
    return embedding if isinstance(embedding, TokenEmbedding) else None


def save_textual_inversion(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """`{token: n x D}`: the one-key layout diffusers' load_textual_inversion reads (n > 1 becomes tok, tok_1, ...)."""
    return write_safetensors(path, {token: vectors.detach().float().cpu()}, {"format": "pt"})
