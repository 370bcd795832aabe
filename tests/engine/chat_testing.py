"""Shared by the multi-turn tests: a character-level chat tokenizer (ChatML-like template, tools
in a system message, <|im_end|> ending every turn and serving as EOS) and a tiny policy saved with it."""
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<bos>", "<|im_end|>", "<|im_start|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(merges: bool = False, template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character (merges=True: also "ab" as one token, merged from "a" "b": the
    re-tokenisation trap); the specials as whole tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + (["ab"] if merges else []))}
    if merges:
        core = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="<unk>"))
    else:
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


def save_policy(directory: Path, tokenizer, seed: int = 0, eos_logit: float = 0.0,
                **config) -> Path:
    """A tiny random Llama with `tokenizer`, saved as a Hugging Face directory. eos_logit > 0: EOS
    gets about that logit at every position (one residual dimension held constant and read by EOS's
    row of the LM head), so that the random policy ends its turns within a few tokens."""
    import torch

    from fastppo.models import tiny_llama

    torch.manual_seed(seed)
    lm = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    **config)
    lm.config.max_position_embeddings = 512
    lm = type(lm)(lm.config)  # rebuilt at the wider context
    if eos_logit:
        favour_eos(lm, tokenizer.eos_token_id, eos_logit)
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def favour_eos(lm, eos_id: int, logit: float) -> None:
    """Give EOS about `logit` more at every position of a Llama: the residual stream's dimension 0
    holds the same large value everywhere (nothing writes to it) and, after the final RMSNorm (about
    sqrt(hidden) there), only EOS's row of the LM head reads it. A random policy then ends its turns."""
    import torch

    with torch.no_grad():
        lm.model.embed_tokens.weight[:, 0] = 10.0
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        lm.lm_head.weight[eos_id, 0] = logit / lm.config.hidden_size ** 0.5
