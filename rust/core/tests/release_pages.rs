//! `Gguf::release_tensor_pages`, what a GPU that shares DRAM with the CPU (a Jetson) does
//! after uploading the weights so they are not in memory twice: the process lets go of
//! the file's tensor pages, and the model still computes the same logits from the file.

mod common;

use common::{tiny_llama, Tiny};
use edgelm_core::engine::{Engine, LoadOptions};
use edgelm_core::gguf::Gguf;
use edgelm_core::quant::GgmlType;

/// Resident bytes of this process's map of `path` (/proc/self/smaps).
fn resident(path: &std::path::Path) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.to_str().unwrap();
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        // A mapping's first line starts with its address range: "lo-hi perms offset ...".
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(name);
        } else if let Some(kb) = line.strip_prefix("Rss:").filter(|_| inside) {
            total += kb.trim().trim_end_matches("kB").trim().parse::<usize>().unwrap() * 1024;
        }
    }
    total
}

#[test]
fn released_tensor_pages_leave_memory_and_come_back_from_the_file() {
    let t = Tiny { n_embd: 512, n_ff: 1536, n_layer: 4, n_head: 8, n_head_kv: 4, n_vocab: 4000, wtype: GgmlType::F32 };
    let dir = std::env::temp_dir().join(format!("edgelm-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::write(&path, tiny_llama(&t).to_bytes()).unwrap();
    let size = std::fs::metadata(&path).unwrap().len() as usize;

    let engine = Engine::load(&path, &LoadOptions { n_threads: Some(2), kernel_level: None, n_ctx: None }).unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 4000).collect();
    let before = engine.logits(&prompt).unwrap();
    let held = resident(&path);
    assert!(held > size / 2, "after a forward pass the weights are resident: {held} of {size} bytes");

    let released = engine.model.file.release_tensor_pages().unwrap();
    let left = resident(&path);
    eprintln!("model file {size} bytes: resident {held} → {left} after releasing {released}");
    assert!(released > size * 9 / 10, "released {released} of {size}");
    assert!(left < size / 20, "{left} bytes still resident after the release");

    // The weights come back from the file: the same logits, bit for bit.
    let after = engine.logits(&prompt).unwrap();
    assert!(before.iter().zip(&after).all(|(a, b)| a.to_bits() == b.to_bits()), "logits changed after the release");
    assert!(resident(&path) > size / 2);

    // An image held in memory has nothing to give up.
    let owned = Gguf::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(owned.release_tensor_pages().unwrap(), 0);
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
