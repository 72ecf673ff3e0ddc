"""Parameter suites: the tensor shapes of real models, without their code or weights.

Each suite lists (name, shape) of every trainable tensor in the model's
``named_parameters()`` order, generated from the architecture's layer
configuration (the same loops the model code runs), so the tensor count and the
size mix are those an optimizer sees when training that model.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    shapes: tuple  # ((tensor name, shape), ...)

    def __len__(self):
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(prod(shape) for _, shape in self.shapes)

    def scaled(self, divisor: int) -> "Suite":
        """The same tensors with every dimension >= 64 divided by ``divisor``
        (kernel sizes, heads and tiny dimensions kept): the size mix of the model
        at ~1/divisor² of the parameters, for slow machines (``--small``)."""
        shapes = tuple((n, tuple(d // divisor if d >= 64 else d for d in shape)) for n, shape in self.shapes)
        return Suite(f"{self.name}-small", f"{self.description}, widths / {divisor}", shapes)


def _resnet50():
    """torchvision resnet50: stem, 4 stages of bottlenecks [3, 4, 6, 3], fc.  161 tensors, 25.6 M."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        out_ch = width * 4  # bottleneck expansion
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            for i, shape in enumerate(((width, in_ch, 1, 1), (width, width, 3, 3), (out_ch, width, 1, 1)), 1):
                shapes += [(f"{prefix}.conv{i}.weight", shape),
                           (f"{prefix}.bn{i}.weight", (shape[0],)), (f"{prefix}.bn{i}.bias", (shape[0],))]
            if b == 0:
                shapes += [(f"{prefix}.downsample.0.weight", (out_ch, in_ch, 1, 1)),
                           (f"{prefix}.downsample.1.weight", (out_ch,)), (f"{prefix}.downsample.1.bias", (out_ch,))]
            in_ch = out_ch
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return Suite("resnet50", "ResNet-50 (torchvision)", tuple(shapes))


def _bert(name, hidden, ffn, layers):
    """HF BertModel (uncased vocabulary): embeddings, ``layers`` encoder layers, pooler.
    bert-base: 199 tensors, 109.5 M; bert-large: 391 tensors, 335.1 M."""
    vocab, positions = 30522, 512

    def linear(name, n_out, n_in):
        return [(f"{name}.weight", (n_out, n_in)), (f"{name}.bias", (n_out,))]

    def layer_norm(name):
        return [(f"{name}.weight", (hidden,)), (f"{name}.bias", (hidden,))]

    shapes = [("embeddings.word_embeddings.weight", (vocab, hidden)),
              ("embeddings.position_embeddings.weight", (positions, hidden)),
              ("embeddings.token_type_embeddings.weight", (2, hidden))] + layer_norm("embeddings.LayerNorm")
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            shapes += linear(f"{p}.attention.self.{proj}", hidden, hidden)
        shapes += linear(f"{p}.attention.output.dense", hidden, hidden) + layer_norm(f"{p}.attention.output.LayerNorm")
        shapes += linear(f"{p}.intermediate.dense", ffn, hidden)
        shapes += linear(f"{p}.output.dense", hidden, ffn) + layer_norm(f"{p}.output.LayerNorm")
    shapes += linear("pooler.dense", hidden, hidden)
    return Suite(name, f"{name} (HF BertModel)", tuple(shapes))


def _gpt2_small():
    """HF GPT2Model gpt2 (Conv1D weights are (in, out); lm_head tied to wte).  148 tensors, 124.4 M."""
    hidden, vocab, positions, layers = 768, 50257, 1024, 12
    shapes = [("wte.weight", (vocab, hidden)), ("wpe.weight", (positions, hidden))]
    for i in range(layers):
        p = f"h.{i}"
        shapes += [(f"{p}.ln_1.weight", (hidden,)), (f"{p}.ln_1.bias", (hidden,)),
                   (f"{p}.attn.c_attn.weight", (hidden, 3 * hidden)), (f"{p}.attn.c_attn.bias", (3 * hidden,)),
                   (f"{p}.attn.c_proj.weight", (hidden, hidden)), (f"{p}.attn.c_proj.bias", (hidden,)),
                   (f"{p}.ln_2.weight", (hidden,)), (f"{p}.ln_2.bias", (hidden,)),
                   (f"{p}.mlp.c_fc.weight", (hidden, 4 * hidden)), (f"{p}.mlp.c_fc.bias", (4 * hidden,)),
                   (f"{p}.mlp.c_proj.weight", (4 * hidden, hidden)), (f"{p}.mlp.c_proj.bias", (hidden,))]
    shapes += [("ln_f.weight", (hidden,)), ("ln_f.bias", (hidden,))]
    return Suite("gpt2-small", "GPT-2 small (HF GPT2Model)", tuple(shapes))


def _many_tiny():
    """2048 tensors of 64..1024 elements (0.9 M): where per-tensor overhead dominates."""
    cycle = ((64,), (256,), (32, 32), (16, 3, 3, 3))
    shapes = tuple((f"t{i}", cycle[i % len(cycle)]) for i in range(2048))
    return Suite("many-tiny", "2048 tiny tensors (synthetic)", shapes)


def _tiny():
    """A 5-tensor MLP: the CI smoke test's suite, not a benchmark."""
    shapes = (("fc1.weight", (64, 32)), ("fc1.bias", (64,)), ("norm.weight", (64,)),
              ("fc2.weight", (10, 64)), ("fc2.bias", (10,)))
    return Suite("tiny", "5-tensor MLP (smoke test)", shapes)


SUITES = {s.name: s for s in (_resnet50(), _bert("bert-base", 768, 3072, 12), _bert("bert-large", 1024, 4096, 24),
                               _gpt2_small(), _many_tiny(), _tiny())}
# Other names a user may give a suite (``--suite gpt2``): the records keep the suite's own name.
ALIASES = {"gpt2": "gpt2-small"}
NAMES = (*SUITES, *ALIASES)
# What a full run measures ("tiny" is only for the smoke test; BERT-large, the
# GPU bandwidth target's second model, joins on GPUs).
DEFAULT_SUITES = ("resnet50", "bert-base", "gpt2-small", "many-tiny")
GPU_SUITES = DEFAULT_SUITES + ("bert-large",)
QUICK_SUITES = ("resnet50",)
# --small divides the model suites' widths by this (~1/16 of the parameters).
SMALL_DIVISOR = 4


def get(name: str, small: bool = False) -> Suite:
    name = ALIASES.get(name, name)
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(NAMES)}")
    suite = SUITES[name]
    return suite.scaled(SMALL_DIVISOR) if small and name in ("resnet50", "bert-base", "bert-large", "gpt2-small") else suite
