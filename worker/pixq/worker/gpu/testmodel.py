"""A tiny random PixArt-Σ pipeline built from the real diffusers/transformers classes.

Tests and demos cannot download weights, so they load this pipeline through the same
``from_pretrained`` path as the real checkpoints. It keeps what the queue relies on: a T5
encoder and a sentencepiece tokenizer, a PixArt transformer with resolution binning, and a
VAE that downsamples by 8 so the size rules are those of the real model. Weights are random
(seeded), so images are noise, but deterministic noise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# Enough varied text for sentencepiece to build a small vocabulary.
_CORPUS = """
A small cactus with a happy face in the Sahara desert.
An astronaut riding a horse on the moon, photorealistic, 8k.
A bowl of ramen with steam rising, studio lighting, top view.
A watercolor painting of a lighthouse on a cliff at sunset.
Portrait of an old fisherman, dramatic light, film grain.
A red cube on top of a blue sphere on a wooden table.
A city street at night in the rain with neon reflections.
A cozy cabin in a snowy forest, warm light in the windows.
"""

_VOCAB_SIZE = 256
_TEXT_DIM = 32


def _train_tokenizer(out_dir: Path) -> None:
    import sentencepiece as spm
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_CORPUS * 4)
        prefix = Path(tmp) / "spiece"
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            vocab_size=_VOCAB_SIZE,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            character_coverage=1.0,
            hard_vocab_limit=False,  # the corpus is small; the encoder's table is larger anyway
            minloglevel=2,
        )
        tokenizer = _t5_tokenizer(T5Tokenizer, f"{prefix}.model")
        tokenizer.save_pretrained(out_dir / "tokenizer")


def _t5_tokenizer(cls, spm_file: str):  # type: ignore[no-untyped-def]
    """A T5 tokenizer over a sentencepiece model, for transformers 4 and 5 alike."""
    import inspect

    import sentencepiece as spm

    if "vocab_file" in inspect.signature(cls.__init__).parameters:  # transformers 4
        return cls(vocab_file=spm_file, extra_ids=0, model_max_length=300)
    sp = spm.SentencePieceProcessor(model_file=spm_file)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return cls(vocab=vocab, extra_ids=0, model_max_length=300)


def make_test_model(out_dir: str | Path, seed: int = 0, layers: int = 2, heads: int = 2) -> Path:
    """Write a tiny random PixArt-Σ pipeline to ``out_dir`` with ``save_pretrained``.

    More ``layers`` and ``heads`` make a slower model (fault tests need renders that last).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        norm_num_groups=16,
        cross_attention_dim=heads * 8,
        sample_size=32,  # the 256-pixel bins: any requested size renders small, then resizes
        patch_size=2,
        caption_channels=_TEXT_DIM,
        use_additional_conditions=False,
        interpolation_scale=None,
    )
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=_VOCAB_SIZE,
            d_model=_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: a factor of 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )
    tokenizer = T5Tokenizer.from_pretrained(out / "tokenizer")
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),  # type: ignore[attr-defined]
        transformer=transformer.eval(),  # type: ignore[attr-defined]
        scheduler=scheduler,
    )
    pipe.save_pretrained(out)  # type: ignore[attr-defined]
    return out
