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
