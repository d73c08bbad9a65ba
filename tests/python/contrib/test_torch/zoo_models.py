"""The model zoo of the real-models tests: Hugging Face transformers, timm and torchvision
models people serve, in small configurations (2 layers, hidden 32-64, small images) with
random weights, and the inputs each takes."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

SEQ = 16
VOCAB = 100


def _ids(batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))


def _padding_mask(batch: int = 1) -> torch.Tensor:
    """A padding mask with padded positions at the end (ones, then zeros)."""
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[:, SEQ - 4:] = 0
    return mask


def _hf(model_class: str, config_class: str, attn: str, **config):
    import transformers  # pylint: disable=import-outside-toplevel

    cfg = getattr(transformers, config_class)(torchscript=True, attn_implementation=attn,
                                              **config)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(cfg).eval()


def bert(attn):
    model = _hf("BertModel", "BertConfig", attn, vocab_size=VOCAB, hidden_size=64,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return model, (_ids(), _padding_mask())


def distilbert(attn):
    model = _hf("DistilBertModel", "DistilBertConfig", attn, vocab_size=VOCAB, dim=64,
                n_layers=2, n_heads=4, hidden_dim=128)
    return model, (_ids(), _padding_mask())


def roberta(attn):
    model = _hf("RobertaModel", "RobertaConfig", attn, vocab_size=VOCAB, hidden_size=64,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, pad_token_id=1)
    return model, (_ids(), _padding_mask())


class KeywordInputs(torch.nn.Module):
    """Calls a model with its positional inputs as keyword arguments (GPT-2's second
    positional argument is the cache, not the attention mask)."""

    def __init__(self, model: torch.nn.Module, names: Tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)))


def gpt2(attn):
    model = _hf("GPT2Model", "GPT2Config", attn, vocab_size=VOCAB, n_embd=64, n_layer=2,
                n_head=4, use_cache=False)
    return KeywordInputs(model, ("input_ids", "attention_mask")).eval(), \
        (_ids(), _padding_mask())


def bart_encoder(attn):
    model = _hf("BartModel", "BartConfig", attn, vocab_size=VOCAB, d_model=64,
                encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2).get_encoder()
    return model, (_ids(), _padding_mask())


def t5_encoder(attn):
    model = _hf("T5EncoderModel", "T5Config", attn, vocab_size=VOCAB, d_model=64, d_kv=16,
                d_ff=128, num_layers=2, num_heads=4)
    return model, (_ids(), _padding_mask())


def whisper_encoder(attn):
    model = _hf("WhisperModel", "WhisperConfig", attn, vocab_size=VOCAB, d_model=64,
                encoder_layers=2, encoder_attention_heads=4, decoder_layers=1,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                num_mel_bins=16, max_source_positions=16, pad_token_id=1, bos_token_id=2,
                eos_token_id=3, decoder_start_token_id=2).get_encoder()
    features = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    return model, (features,)


def hf_vit(attn):
    model = _hf("ViTModel", "ViTConfig", attn, image_size=32, patch_size=8, hidden_size=64,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return model, (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def llama(attn):
    model = _hf("LlamaModel", "LlamaConfig", attn, vocab_size=VOCAB, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return model, (_ids(), torch.ones(1, SEQ, dtype=torch.long))


#: Hugging Face models: name -> builder(attn_implementation).
HF_MODELS: Dict[str, Callable] = {
    "bert": bert, "distilbert": distilbert, "roberta": roberta, "gpt2": gpt2,
    "bart_encoder": bart_encoder, "t5_encoder": t5_encoder,
    "whisper_encoder": whisper_encoder, "vit": hf_vit, "llama": llama,
}


def _timm(name: str, size: int, **kwargs):
    import timm  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    return model, (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)


#: timm and torchvision models: name -> builder().
VISION_MODELS: Dict[str, Callable] = {
    "timm_resnet": lambda: _timm("resnet10t", 64),
    "timm_efficientnet": lambda: _timm("efficientnet_b0", 64),
    "timm_mobilenetv3": lambda: _timm("mobilenetv3_small_050", 64),
    "timm_convnext": lambda: _timm("convnext_atto", 64),
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", 32, img_size=32, depth=2),
    "timm_swin": lambda: _timm("swin_tiny_patch4_window7_224", 112, img_size=112,
                               embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "timm_regnet": lambda: _timm("regnety_002", 64),
    "timm_deit": lambda: _timm("deit_tiny_patch16_224", 32, img_size=32, depth=2),
    "torchvision_vit_b_16": lambda: _torchvision_vit(),
    "torchvision_mobilenet_v2": lambda: _torchvision_mobilenet_v2(),
}


def _torchvision_vit():
    import torchvision  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                                 num_heads=2, hidden_dim=32,
                                                 mlp_dim=64).eval()
    return model, (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def input_infos(inputs: Tuple[torch.Tensor, ...]) -> List[tuple]:
    """``input_infos`` for a tuple of example inputs."""
    return [(f"input{i}", tuple(x.shape), str(x.dtype).replace("torch.", ""))
            for i, x in enumerate(inputs)]


def _torchvision_mobilenet_v2():
    """ReLU6 after every convolution, and inverted residuals."""
    import torchvision  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5).eval()
    return model, (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
