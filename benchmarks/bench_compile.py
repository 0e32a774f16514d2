"""Does PyTorch's compiler make the book's decoding faster? The one lever left on the time
``docs/chapter_work.md`` puts in operator calls (decoding one token at a time).

The real model decodes 8 prompts of 64 tokens, 32 new tokens each, greedily, with the
book's ``sampling.generate`` (a KV cache), once as it is (eager) and once through
``torch.compile(model, dynamic=True)`` (the growing cache and prompt lengths change the
shapes at every step, so a static compile would recompile at each one). The tokens are
checked equal first. Two lines: the first call of the compiled model, which compiles it
(4 new tokens), against the same call eager; then, compiled, REPEAT runs of each in turns
(``llmbook.utils.time_interleaved``), the median of each. The compiler's cache goes to a
new temporary folder, so the first call compiles from nothing, as on a reader's first run.
"""

import os
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmbook-inductor-")  # before torch

import torch  # noqa: E402
from llmbook import models, sampling  # noqa: E402
from llmbook.utils import time_interleaved  # noqa: E402

ROWS, PROMPT, NEW, FIRST, REPEAT = 8, 64, 32, 4, 3


def main():
    model, _ = models.load_model()
    prompts = torch.randint(100, model.config.vocab_size, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))

    def decode(m, new=NEW):
        with torch.no_grad():
            return sampling.generate(m, prompts, max_new_tokens=new, temperature=0.0)

    compiled = torch.compile(model, dynamic=True)
    start = time.perf_counter()
    first = decode(compiled, FIRST)
    compiling = time.perf_counter() - start
    start = time.perf_counter()
    eager_first = decode(model, FIRST)
    eager_seconds = time.perf_counter() - start
    assert torch.equal(first, eager_first), "the compiled model decodes other tokens"
    assert torch.equal(decode(compiled), decode(model)), "the compiled model decodes other tokens"
    what = f"({model.device.type}, {ROWS} rows x {PROMPT} prompt tokens, greedy, torch {torch.__version__})"
    print(f"first call of torch.compile(model, dynamic=True), which compiles, {FIRST} new tokens {what}: "
          f"compiled {compiling:.1f} s, eager {eager_seconds:.2f} s, ratio {compiling / eager_seconds:.0f}")
    seconds = time_interleaved({"compiled": lambda: decode(compiled), "eager": lambda: decode(model)},
                               repeat=REPEAT, warmup=0)
    print(f"decoding {NEW} new tokens once compiled, compiled / eager {what}: compiled {seconds['compiled']:.2f} s, "
          f"eager {seconds['eager']:.2f} s, ratio {seconds['compiled'] / seconds['eager']:.2f}")


if __name__ == "__main__":
    main()
