
#[test]
fn timing() {
    for f in ["gemma-3-270m-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"] {
        let t = std::time::Instant::now();
        let g = embody_engine::gguf::Gguf::open(&std::path::Path::new("/root/.cache/embody/models").join(f)).unwrap();
        eprintln!("open {:?}", t.elapsed());
        let v = embody_engine::tokenizer::GgufVocab::from_gguf(&g).unwrap();
        eprintln!("vocab {:?}", t.elapsed());
        let tok = embody_engine::tokenizer::Tokenizer::from_vocab(v).unwrap();
        eprintln!("built {:?} {}", t.elapsed(), tok.vocab_size());
        let t = std::time::Instant::now();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
        let ids = tok.encode(&text, true, true).unwrap();
        eprintln!("encode {} chars -> {} ids {:?}", text.len(), ids.len(), t.elapsed());
    }
}
