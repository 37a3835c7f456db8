"""``genserve train text-tiny``: trains the embedded Llama decoder and its BPE tokenizer.

The output is a Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with a ChatML chat template, ``generation_config.json``) that our engine,
``transformers`` and vLLM all load, plus a model card (``README.md``) with the measured numbers.
Training runs for a wall-clock budget; the learning rate follows warm-up then cosine decay over
that budget, and the checkpoint with the lowest held-out loss is the one saved.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from genserve.models.common.training import adamw, lr_at, set_lr, snapshot
from genserve.models.llama.corpus import Doc, documents
from genserve.models.llama.model import LlamaConfig, LlamaForCausalLM, load_llama
from genserve.models.text.generate import TextModel, generate
from genserve.models.text.sampling import SamplingParams

log = logging.getLogger(__name__)

BOS = EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SYSTEM_PROMPT = "You are a helpful assistant that answers questions about Python."
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ("The json module", "def read_file(path):", "A list comprehension")
SAMPLE_QUESTIONS = ("What does os.path.join do?", "Explain the with statement.")


@dataclass
class TrainConfig:
    minutes: float = 45.0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    context: int = 512
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    seed: int = 0
    threads: int = 2


def build_tokenizer(docs: list[Doc], vocab_size: int):
    """Byte-level BPE (as GPT-2 and Llama 3), so any UTF-8 text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(((d.question or "") + d.text for d in docs), trainer=trainer)
    # Completion prompts get <|endoftext|> prepended, as every training document has it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                 model_max_length=None, clean_up_tokenization_spaces=False)
    hf.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def render(doc: Doc, tok, rng: random.Random) -> str:
    if doc.question is None:
        return BOS + doc.text
    messages = [{"role": "user", "content": doc.question}, {"role": "assistant", "content": doc.text}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return tok.apply_chat_template(messages, tokenize=False)


def encode(docs: list[Doc], tok, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    train, held = [], []
    for doc in docs:
        ids = tok(render(doc, tok, rng), add_special_tokens=False)["input_ids"]
        (held if doc.held_out else train).extend(ids)
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, ids: torch.Tensor, context: int) -> float:
    """Mean next-token negative log-likelihood over consecutive windows of the held-out tokens."""
    model.eval()
    n = (len(ids) - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1: n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(x[i:i + 16])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 16].flatten(), reduction="sum").item()
    model.train()
    return total / (n * context)


def train_text_tiny(out: Path, cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    docs = documents()
    tok = build_tokenizer(docs, cfg.vocab_size)
    train_ids, held_ids = encode(docs, tok, cfg.seed)
    log.info("corpus: %d documents, %d train tokens, %d held-out tokens, tokenizer in %.0fs",
             len(docs), len(train_ids), len(held_ids), time.time() - t0)

    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.context)
    model = LlamaForCausalLM(mcfg)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (float("inf"), None, 0)
    step, start, budget = 0, time.time(), cfg.minutes * 60
    while (elapsed := time.time() - start) < budget:
        set_lr(opt, lr_at(cfg, step, elapsed / budget))
        offsets = torch.randint(0, len(train_ids) - cfg.context - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[o:o + cfg.context + 1] for o in offsets.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % cfg.eval_every == 0:
            nll = heldout_nll(model, held_ids, cfg.context)
            if nll < best[0]:
                best = (nll, snapshot(model), step)
            log.info("step %d  %.0fs  train loss %.3f  held-out nll %.3f (ppl %.1f)  lr %.2e",
                     step, elapsed, loss.item(), nll, math.exp(nll), opt.param_groups[0]["lr"])
    if best[1] is not None:
        model.load_state_dict(best[1])
    save_hf(model, tok, out)
    # Measure what ships: the saved bf16 weights, loaded back through our loader in fp32.
    shipped = load_llama(out)
    nll = heldout_nll(shipped, held_ids, cfg.context)
    report = {"steps": step, "best_step": best[2], "minutes": (time.time() - t0) / 60,
              "parameters": n_params, "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
              "tokens_seen": step * cfg.batch_size * cfg.context, "heldout_nll": nll,
              "heldout_ppl": math.exp(nll), "documents": len(docs), "config": asdict(cfg)}
    write_card(out, shipped, tok, report)
    return report


def save_hf(model: LlamaForCausalLM, tok, out: Path, bos: str = BOS, eos: tuple[str, ...] = (BOS, IM_END),
            chat_template: str | None = CHAT_TEMPLATE) -> None:
    """Saves a Hugging Face directory: bf16 safetensors, config, generation config, tokenizer."""
    from transformers import GenerationConfig
    from transformers import LlamaConfig as HFLlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    bos_id, eos_ids = tok.convert_tokens_to_ids(bos), [tok.convert_tokens_to_ids(t) for t in eos]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    HFLlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                  rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
                  bos_token_id=bos_id, eos_token_id=eos_ids[0], pad_token_id=pad_id,
                  torch_dtype="bfloat16").save_pretrained(out)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(out)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (c.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    make_portable(out, chat_template)


def make_portable(out: Path, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """Writes the spellings that transformers 4.x and vLLM read beside transformers 5's own:
    ``architectures`` (vLLM picks the model class by it), ``torch_dtype`` and a top-level
    ``rope_theta``; the generic fast-tokenizer class; the chat template (if any) inline in
    ``tokenizer_config.json`` rather than only in ``chat_template.jinja``."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(architectures=["LlamaForCausalLM"], torch_dtype=cfg.get("dtype", "bfloat16"),
               rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=cfg["max_position_embeddings"])
    if chat_template is not None:
        tc.update(chat_template=chat_template,
                  additional_special_tokens=tc.get("extra_special_tokens", [IM_START, IM_END]))
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")


def greedy_text(tm: TextModel, prompt_ids: list[int], max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return "".join(o.text for outs in generate(tm, prompt_ids, params) for o in outs)


def write_card(out: Path, model: LlamaForCausalLM, tok, report: dict) -> None:
    tm = TextModel(model, tok, {tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(IM_END)},
                   model.config.max_position_embeddings, torch.device("cpu"))
    samples = [f"**{p}** → {greedy_text(tm, tok(p)['input_ids'], 48)!r}" for p in SAMPLE_PROMPTS]
    for q in SAMPLE_QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        samples.append(f"**chat: {q}** → {greedy_text(tm, ids, 48)!r}")
    c, r = model.config, report
    card = f"""# genserve-text-tiny

A {r['parameters'] / 1e6:.2f}M-parameter Llama-architecture decoder (RoPE, RMSNorm, SwiGLU,
grouped-query attention: {c.num_attention_heads} query heads, {c.num_key_value_heads} key/value heads,
{c.num_hidden_layers} layers, width {c.hidden_size}, context {c.max_position_embeddings}) with a
{c.vocab_size}-token byte-level BPE tokenizer and a ChatML chat template. It is the embedded text
model of genserve: small enough to train on two CPU cores, meant for tests and demos, not for use.

## Data
Shipped with CPython {platform.python_version()} itself, under the Python Software Foundation
License (PSF-2.0): the `pydoc_data.topics` language-reference topics, the docstrings of the
standard library's modules, classes and functions (read with `ast`, tests excluded), and
question/answer pairs derived from those docstrings ("What does json.dumps do?" → its first
paragraph) rendered with the chat template. {r['documents']} documents;
{r['train_tokens']:,} training tokens and {r['heldout_tokens']:,} held-out tokens (about 5% of
documents, chosen by a hash of their name).

## Training
`genserve train text-tiny --minutes {r['config']['minutes']:g}` on {torch.get_num_threads()} CPU
threads ({platform.processor() or platform.machine()}): AdamW, peak learning rate
{r['config']['lr']}, warm-up then cosine decay over the time budget, batch
{r['config']['batch_size']} × {r['config']['context']} tokens, bf16 autocast. {r['steps']} steps
({r['tokens_seen']:,} tokens) in {r['minutes']:.1f} minutes including tokenizer training; the
checkpoint with the best held-out loss (step {r['best_step']}) is saved, in bfloat16.

## Quality
Held-out perplexity of the shipped weights: **{r['heldout_ppl']:.2f}** per token (mean NLL
{r['heldout_nll']:.3f} nats, {r['heldout_tokens']:,} tokens, fp32 compute).

Greedy samples:

""" + "\n".join(f"- {s}" for s in samples) + "\n"
    (out / "README.md").write_text(card)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def train(out: Path, minutes: float, seed: int = 0) -> dict:
    """``genserve train text-tiny``."""
    report = train_text_tiny(out, TrainConfig(minutes=minutes, seed=seed))
    log.info("saved %s: held-out perplexity %.2f after %d steps", out, report["heldout_ppl"], report["steps"])
    return report
