"""Tiny Hugging Face text models for the tests of the command and the pipeline."""

from __future__ import annotations

import torch

WORDS = ("the a of to in is was for on that with as by it this be are from at or an which "
         "function class value module return list string object type name file data error method "
         "python code call argument default number new set use".split())


def save_tiny_bert(directory, *, hidden_size=32, blocks=2, seed=0):
    """Save a ``blocks``-block BERT with a WordPiece tokenizer of :data:`WORDS` in ``directory``,
    as a Hugging Face model directory; return ``directory``."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)})
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden_size, num_hidden_layers=blocks,
                                     num_attention_heads=2, intermediate_size=2 * hidden_size,
                                     vocab_size=len(WORDS) + 5, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_texts(path, count, seed):
    """``count`` lines of 12 random words of :data:`WORDS` in ``path``; return ``path``."""
    generator = torch.Generator().manual_seed(seed)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=generator))
             for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def random_bert(vocab_size=200, seed=0):
    """A 2-block BERT (hidden size 32) with random weights, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    return transformers.BertModel(config).eval()


def random_token_batches(vocab_size=200, length=24, count=3, seed=1):
    """``count`` batches of 4 rows of ``length`` random tokens, for :func:`random_bert`."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (4, length), generator=generator),
             "attention_mask": torch.ones(4, length, dtype=torch.long)} for _ in range(count)]


#: Tiny random-weight configs of the causal-LM families the pipeline is tested on: each block's
#: linear layers are found and compressed, whatever the family's layout (GPT-2's ``Conv1D``,
#: Phi-3's fused ``qkv_proj`` and ``gate_up_proj``, OPT's decoder under ``model.decoder``).
CAUSAL_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=32)),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=128, original_max_position_embeddings=128)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128)),
}

_SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")


def word_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` with pad, unk, bos and eos tokens."""
    import tokenizers
    import transformers

    vocab = {token: index for index, token in enumerate((*_SPECIAL, *WORDS))}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def tiny_causal_lm(family, seed=0):
    """A random-weight causal LM of ``family`` (:data:`CAUSAL_CONFIGS`) over :func:`word_tokenizer`'s
    vocabulary, in eval mode."""
    import transformers

    config_name, options = CAUSAL_CONFIGS[family]
    config = getattr(transformers, config_name)(vocab_size=len(_SPECIAL) + len(WORDS), pad_token_id=0,
                                                bos_token_id=2, eos_token_id=3, **options)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_tiny_causal_lm(directory, family="llama", seed=0):
    """Save :func:`tiny_causal_lm` and its tokenizer as a model directory; return ``directory``."""
    tiny_causal_lm(family, seed).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory
