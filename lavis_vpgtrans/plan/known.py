"""Architecture numbers of the models the configs name by hub id, for planning without the hub.

The planner reads a model's config.json when `llm_model` / `qformer_model` is a local directory
(or a `toy:` path); a hub id that is not on disk is looked up here. Each entry holds the
architecture fields of the model's Hugging Face config.json (what decides its parameter count and
its activations), and where they were read. Only sizes matter here: no weights, no tokenizer.
"""

# hub id -> (AutoConfig.for_model(**fields), source)
KNOWN_LLM_CONFIGS = {
    "facebook/opt-125m": (
        dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
             word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
             tie_word_embeddings=True),
        "huggingface.co/facebook/opt-125m config.json"),
    "facebook/opt-350m": (
        # the one OPT with a 512-wide embedding projected to 1024, and post-layer-norm
        dict(model_type="opt", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
             word_embed_proj_dim=512, vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=False,
             tie_word_embeddings=True),
        "huggingface.co/facebook/opt-350m config.json"),
    "facebook/opt-1.3b": (
        dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
             word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048, tie_word_embeddings=True),
        "huggingface.co/facebook/opt-1.3b config.json"),
    "facebook/opt-2.7b": (
        dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
             word_embed_proj_dim=2560, vocab_size=50272, max_position_embeddings=2048, tie_word_embeddings=True),
        "huggingface.co/facebook/opt-2.7b config.json"),
    "facebook/opt-6.7b": (
        dict(model_type="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
             word_embed_proj_dim=4096, vocab_size=50272, max_position_embeddings=2048, tie_word_embeddings=True),
        "huggingface.co/facebook/opt-6.7b config.json"),
    "huggyllama/llama-7b": (
        dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048,
             tie_word_embeddings=False),
        "huggingface.co/huggyllama/llama-7b config.json (LLaMA-7B)"),
    "lmsys/vicuna-7b-v1.1": (
        dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048,
             tie_word_embeddings=False),
        "huggingface.co/lmsys/vicuna-7b-v1.1 config.json (LLaMA-7B's architecture)"),
    "lmsys/vicuna-13b-v1.1": (
        dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
             num_key_value_heads=40, intermediate_size=13824, vocab_size=32000, max_position_embeddings=2048,
             tie_word_embeddings=False),
        "huggingface.co/lmsys/vicuna-13b-v1.1 config.json (LLaMA-13B's architecture)"),
    "meta-llama/Meta-Llama-3-8B": (
        dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
             rope_theta=500000.0, tie_word_embeddings=False),
        "huggingface.co/meta-llama/Meta-Llama-3-8B config.json"),
    "Qwen/Qwen2.5-7B": (
        dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072,
             tie_word_embeddings=False),
        "huggingface.co/Qwen/Qwen2.5-7B config.json"),
    "mistralai/Mistral-7B-v0.1": (
        dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
             tie_word_embeddings=False),
        "huggingface.co/mistralai/Mistral-7B-v0.1 config.json"),
    "google/flan-t5-base": (
        dict(model_type="t5", d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
             vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "huggingface.co/google/flan-t5-base config.json"),
    "google/flan-t5-large": (
        dict(model_type="t5", d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24,
             vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "huggingface.co/google/flan-t5-large config.json"),
    "google/flan-t5-xl": (
        dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
             vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "huggingface.co/google/flan-t5-xl config.json"),
    "google/flan-t5-xxl": (
        dict(model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
             vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "huggingface.co/google/flan-t5-xxl config.json"),
}

# The Q-Former's BERT (LAVIS's Blip2Base builds it from bert-base-uncased's config).
KNOWN_BERT_CONFIGS = {
    "bert-base-uncased": (
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu"),
        "huggingface.co/bert-base-uncased config.json"),
}

# LAVIS's ViTs by name: the arguments of lavis.models.eva_vit.create_eva_vit_g and
# lavis.models.clip_vit.create_clip_vit_L (LAVIS 1.0.2), which download their weights; the
# planner builds the same classes with these arguments on the meta device.
EVA_VIT_G = dict(patch_size=14, embed_dim=1408, depth=39, num_heads=1408 // 88, mlp_ratio=4.3637, qkv_bias=True)
CLIP_VIT_L = dict(patch_size=14, width=1024, layers=22, heads=16)
