//! Route a few tokens with the Pangu Pro MoE preset, on the GPU, and check the result against the
//! CPU reference: `cargo run --release --example route_tokens`.

use fusedops::check::{Tolerance, compare};
use fusedops::gpu::Gpu;
use fusedops::ops::merrouter::{self, RouterConfig, RouterInputs, Scores, reference};
use fusedops::tensor::Tensor;

fn main() -> fusedops::Result<()> {
    let gpu = Gpu::new()?; // the best adapter; Error::NoAdapter with an install hint if none
    let config = RouterConfig::preset("pangu-pro-moe")?; // 64 experts, top-1 of each of 8 groups
    let tokens = 4;
    let logits: Vec<f32> = (0..tokens * 64)
        .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
        .collect();
    let logits = Tensor::f32(&[tokens, 64], logits)?;
    let router_scale = Tensor::f32(&[64], vec![1.0; 64])?;
    let inputs = RouterInputs {
        scores: Scores::Logits(&logits),
        bias: None,
        router_scale: Some(&router_scale),
    };
    let out = merrouter::route_and_dispatch(&gpu, &config, &inputs)?;
    let ids = out.topk_ids.as_i32().expect("ids are i32");
    for (token, row) in ids.chunks(config.top_k).enumerate() {
        println!("token {token}: experts {row:?}");
    }
    println!(
        "expert counts: {:?}",
        out.layout.counts.as_i32().expect("i32")
    );

    let want = reference::route(
        &config,
        tokens,
        &logits.to_f64(),
        None,
        Some(&router_scale.to_f64()),
    )?;
    let check = compare(ids, &want.ids, Tolerance::EXACT);
    println!(
        "ids against the CPU reference: {}",
        check.summary(&[tokens, config.top_k])
    );
    Ok(())
}
