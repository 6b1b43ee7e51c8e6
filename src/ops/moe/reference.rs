//! CPU reference of the MoE layer, built from the routers' and the grouped matmul's references:
//! [`merrouter::reference`] for the gate logits, the routing and the dispatch layout,
//! [`swiftgmm::reference::grouped_matmul`] (f64 accumulation) for every expert's gate/up with
//! SwiGLU and down with the routing weight as row scale.
//!
//! Every intermediate is rounded to the dtype the GPU stores it in, at the point where the GPU
//! stores it: the SwiGLU output and the weighted expert outputs in the activation dtype, the
//! shared expert's likewise, and the final sum in the output dtype. The routing weight enters the
//! down projection as an f32, as on the GPU. What remains between the two is the f32-vs-f64
//! accumulation and the rare value that rounds the other way (see [`super::tolerance`]).
//!
//! The expert outputs of a token depend only on that token and its routing, so the reference can
//! be computed for a subset of tokens ([`token_outputs`]) while the routing always covers all of
//! them (the layout depends on every token).

use super::{HostWeights, MoeConfig};
use crate::error::{Error, Result};
use crate::ops::merrouter::reference::{self as router_ref, LayoutRef, RoutingRef};
use crate::ops::swiftgmm::{Activation, reference::grouped_matmul};
use crate::tensor::{DType, Tensor};

const OP: &str = "moe reference";

/// Where the reference takes one expert's weights from: a whole `[e, a, b]` tensor, or a
/// generator that makes them on demand (the large presets' weights never exist as one host
/// tensor).
pub trait ExpertSource {
    /// Number of experts.
    fn experts(&self) -> usize;
    /// Expert `e`'s weights as a one-expert tensor `[1, a, b]`.
    fn expert(&self, e: usize) -> Result<Tensor>;
}

impl ExpertSource for Tensor {
    fn experts(&self) -> usize {
        self.shape().first().copied().unwrap_or(0)
    }

    fn expert(&self, e: usize) -> Result<Tensor> {
        let &[experts, a, b] = self.shape() else {
            return Err(Error::shape(
                OP,
                "expert weights",
                self.shape(),
                "[e, a, b]",
            ));
        };
        if e >= experts {
            return Err(Error::invalid(
                OP,
                "expert",
                format!("{e} is not in 0..{experts}"),
            ));
        }
        let bytes = a * b * self.dtype().size();
        Tensor::from_bytes(
            &[1, a, b],
            self.dtype(),
            &self.bytes()[e * bytes..(e + 1) * bytes],
        )
    }
}

/// The expert weights of a layer, wherever they come from: the routed experts' `gate_up`
/// (`[e, 2i, h]`, Nk) and `down` (`[e, h, i]`), and the optional shared expert's pair
/// (`[1, 2·is, h]`, `[1, h, is]`); Kn transposes each.
#[derive(Clone, Copy)]
pub struct Experts<'a> {
    pub gate_up: &'a dyn ExpertSource,
    pub down: &'a dyn ExpertSource,
    pub shared: Option<(&'a dyn ExpertSource, &'a dyn ExpertSource)>,
}

impl<'a> Experts<'a> {
    /// The experts of host weights.
    pub fn of(weights: &HostWeights<'a>) -> Self {
        Experts {
            gate_up: weights.gate_up,
            down: weights.down,
            shared: weights
                .shared
                .map(|(g, d)| (g as &dyn ExpertSource, d as &dyn ExpertSource)),
        }
    }
}

/// The whole layer as the reference computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRef {
    pub routing: RoutingRef,
    pub layout: LayoutRef,
    /// `[t, h]`, rounded to the output dtype.
    pub out: Vec<f64>,
}

/// Routing and dispatch layout of `t` tokens from their `logits [t, e]` (see
/// [`router_ref::route`] and [`router_ref::dispatch`]).
pub fn routing(
    config: &MoeConfig,
    t: usize,
    logits: &[f64],
    bias: Option<&[f64]>,
    router_scale: Option<&[f64]>,
) -> Result<(RoutingRef, LayoutRef)> {
    let r = &config.router;
    let routing = router_ref::route(r, t, logits, bias, router_scale)?;
    let layout = router_ref::dispatch(&routing.ids, t, r.top_k, r.experts, r.groups, r.block_size)?;
    Ok((routing, layout))
}

/// `x` rounded as the GPU stores a value of `dtype`: to f32 (the GPU's accumulator), then to
/// `dtype`.
pub(crate) fn stored(x: f64, dtype: DType) -> f64 {
    dtype.round(x as f32) as f64
}

/// Rows `rows` of a 2-D tensor, in that order.
pub(crate) fn select_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let &[n, cols] = t.shape() else {
        return Err(Error::shape(OP, "tensor", t.shape(), "[rows, cols]"));
    };
    let row_bytes = cols * t.dtype().size();
    let mut bytes = Vec::with_capacity(rows.len() * row_bytes);
    for &r in rows {
        if r >= n {
            return Err(Error::invalid(OP, "row", format!("{r} is not in 0..{n}")));
        }
        bytes.extend_from_slice(&t.bytes()[r * row_bytes..(r + 1) * row_bytes]);
    }
    Tensor::from_bytes(&[rows.len(), cols], t.dtype(), &bytes)
}

/// One expert MLP over the rows `x [n, h]`: `down · (silu(gate · x) ⊙ (up · x))`, the SwiGLU
/// output rounded to the activation dtype (x's), each output row times `scale[row]` (f32) and
/// rounded to the activation dtype. Returns `[n, h]`.
fn expert_mlp(
    config: &MoeConfig,
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    scale: Option<Vec<f32>>,
) -> Result<Vec<f64>> {
    let act = x.dtype();
    let n = x.shape()[0];
    let offsets = [0, n as u32];
    let inter = grouped_matmul(
        x,
        &offsets,
        gate_up,
        config.layout,
        Activation::SwiGlu,
        None,
    )?;
    let inter: Vec<f32> = inter.iter().map(|&v| v as f32).collect();
    let inter = Tensor::from_f32(&[n, inter.len() / n.max(1)], &inter, act)?;
    let scale = scale.map(|s| Tensor::f32(&[n], s)).transpose()?;
    let y = grouped_matmul(
        &inter,
        &offsets,
        down,
        config.layout,
        Activation::None,
        scale.as_ref(),
    )?;
    Ok(y.iter().map(|&v| stored(v, act)).collect())
}

/// The checks of [`token_outputs`]: the config, `hidden [t, h]`, a routing of exactly those `t`
/// tokens with ids in `0..e`, and experts that match the config.
pub(crate) fn check_token_inputs(
    config: &MoeConfig,
    hidden: &Tensor,
    routing: &RoutingRef,
    experts: &Experts<'_>,
    out_dtype: DType,
) -> Result<()> {
    config.validate()?;
    let (h, k, e) = (config.hidden, config.router.top_k, config.router.experts);
    let t = match *hidden.shape() {
        [t, cols] if cols == h && hidden.dtype().is_float() => t,
        _ => {
            return Err(Error::shape(
                OP,
                "hidden",
                (hidden.shape(), hidden.dtype()),
                format!("[t, {h}] f32, f16 or bf16"),
            ));
        }
    };
    if !out_dtype.is_float() {
        return Err(Error::unsupported(
            OP,
            format!("out of dtype {out_dtype} (expected f32, f16 or bf16)"),
        ));
    }
    let slots = t.checked_mul(k);
    if Some(routing.ids.len()) != slots || Some(routing.weights.len()) != slots {
        return Err(Error::shape(
            OP,
            "routing",
            (routing.ids.len(), routing.weights.len()),
            format!("[{t}, {k}] ids and weights (the {t} tokens of hidden)"),
        ));
    }
    if let Some((slot, &id)) = routing
        .ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id < 0 || id as usize >= e)
    {
        return Err(Error::invalid(
            OP,
            format!("routing.ids[{slot}]"),
            format!("{id} is not an expert (0..{e})"),
        ));
    }
    for (what, have) in [
        ("gate_up experts", experts.gate_up.experts()),
        ("down experts", experts.down.experts()),
    ] {
        if have != e {
            return Err(Error::shape(OP, what, have, format!("{e} (the config's)")));
        }
    }
    if config.shared_intermediate.is_some() != experts.shared.is_some() {
        return Err(Error::invalid(
            OP,
            "shared expert",
            "the config and the experts disagree on whether there is one",
        ));
    }
    Ok(())
}

/// The layer output of the tokens `tokens` (in that order), `[tokens.len(), h]`, given the
/// routing of all tokens: `hidden [t, h]` (its dtype is the activation dtype), the experts, the
/// output dtype.
pub fn token_outputs(
    config: &MoeConfig,
    hidden: &Tensor,
    routing: &RoutingRef,
    experts: &Experts<'_>,
    tokens: &[usize],
    out_dtype: DType,
) -> Result<Vec<f64>> {
    check_token_inputs(config, hidden, routing, experts, out_dtype)?;
    let shared = experts.shared.is_some();
    sum_token_outputs(
        config,
        hidden,
        routing,
        tokens,
        out_dtype,
        shared,
        |x, expert, scale| match (expert, experts.shared) {
            (Some(e), _) => expert_mlp(
                config,
                x,
                &experts.gate_up.expert(e)?,
                &experts.down.expert(e)?,
                scale,
            ),
            (None, Some((gate_up, down))) => {
                expert_mlp(config, x, &gate_up.expert(0)?, &down.expert(0)?, None)
            }
            (None, None) => Err(Error::invalid(OP, "shared expert", "none")),
        },
    )
}

/// The token loop of [`token_outputs`] (inputs checked): every routed expert's MLP over the
/// rows routed to it with their routing weights, `mlp(rows, Some(expert), weights)`, summed per
/// token in slot order, then the shared expert's `mlp(rows, None, None)` when `shared`, then
/// the output dtype.
pub(crate) fn sum_token_outputs(
    config: &MoeConfig,
    hidden: &Tensor,
    routing: &RoutingRef,
    tokens: &[usize],
    out_dtype: DType,
    shared: bool,
    mlp: impl Fn(&Tensor, Option<usize>, Option<Vec<f32>>) -> Result<Vec<f64>>,
) -> Result<Vec<f64>> {
    let (h, k, e) = (config.hidden, config.router.top_k, config.router.experts);
    let x = select_rows(hidden, tokens)?;
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = vec![0.0; tokens.len() * h];
    // Expert by expert, so that each expert's weights are made and widened once.
    for expert in 0..e {
        let mut slots = Vec::new();
        for (s, &token) in tokens.iter().enumerate() {
            for j in 0..k {
                if routing.ids[token * k + j] == expert as i32 {
                    slots.push((s, token * k + j));
                }
            }
        }
        if slots.is_empty() {
            continue;
        }
        let rows: Vec<usize> = slots.iter().map(|&(s, _)| s).collect();
        let weights: Vec<f32> = slots
            .iter()
            .map(|&(_, slot)| routing.weights[slot] as f32)
            .collect();
        let y = mlp(&select_rows(&x, &rows)?, Some(expert), Some(weights))?;
        for (r, &s) in rows.iter().enumerate() {
            for c in 0..h {
                out[s * h + c] += y[r * h + c];
            }
        }
    }
    if shared {
        let y = mlp(&x, None, None)?;
        for (o, v) in out.iter_mut().zip(&y) {
            *o += v;
        }
    }
    Ok(out.iter().map(|&v| stored(v, out_dtype)).collect())
}

/// The whole layer for host tensors: the gate logits `hidden · gate [h, e]`, the routing and
/// layout of every token, and every token's output in `out_dtype`.
pub fn layer(
    config: &MoeConfig,
    hidden: &Tensor,
    weights: &HostWeights<'_>,
    out_dtype: DType,
) -> Result<LayerRef> {
    // The same checks as the GPU layer: the routing reference divides by the group count and
    // indexes the bias and the experts without checking.
    let t = super::check_host_layer(config, hidden, weights, out_dtype)?;
    let (h, e) = (config.hidden, config.router.experts);
    let logits = router_ref::gate_logits(t, h, e, &hidden.to_f64(), &weights.gate.to_f64())?;
    let bias = weights.bias.map(Tensor::to_f64);
    let scale = weights.router_scale.map(Tensor::to_f64);
    let (routing, layout) = routing(config, t, &logits, bias.as_deref(), scale.as_deref())?;
    let tokens: Vec<usize> = (0..t).collect();
    let out = token_outputs(
        config,
        hidden,
        &routing,
        &Experts::of(weights),
        &tokens,
        out_dtype,
    )?;
    Ok(LayerRef {
        routing,
        layout,
        out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::merrouter::{RouterConfig, Selection};
    use crate::ops::swiftgmm::{Layout, reference::silu};

    /// One expert, k = 1, h = 2, i = 1: small enough to write out by hand.
    fn tiny() -> MoeConfig {
        let mut router = RouterConfig::pangu_pro_moe();
        router.experts = 2;
        router.groups = 1;
        router.top_k = 1;
        router.selection = Selection::Moge;
        MoeConfig {
            router,
            hidden: 2,
            intermediate: 1,
            shared_intermediate: Some(1),
            layout: Layout::Nk,
        }
    }

    #[test]
    fn small_layer_by_hand() {
        let config = tiny();
        let hidden = Tensor::f32(&[1, 2], vec![1.0, 2.0]).unwrap();
        // Expert 1 wins: logits [0, 2].
        let gate = Tensor::f32(&[2, 2], vec![0.0, 0.0, 0.0, 1.0]).unwrap();
        // gate_up [2, 2 (gate, up), 2]: expert 1 gate = x0, up = x1.
        let gate_up =
            Tensor::f32(&[2, 2, 2], vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).unwrap();
        // down [2, 2, 1]: expert 1 doubles into column 0, copies into column 1.
        let down = Tensor::f32(&[2, 2, 1], vec![0.0, 0.0, 2.0, 1.0]).unwrap();
        let shared_gate_up = Tensor::f32(&[1, 2, 2], vec![0.0, 1.0, 1.0, 0.0]).unwrap();
        let shared_down = Tensor::f32(&[1, 2, 1], vec![1.0, 0.0]).unwrap();
        let weights = HostWeights {
            gate: &gate,
            bias: None,
            router_scale: None,
            gate_up: &gate_up,
            down: &down,
            shared: Some((&shared_gate_up, &shared_down)),
        };
        let r = layer(&config, &hidden, &weights, DType::F32).unwrap();
        assert_eq!(r.routing.ids, vec![1]);
        let w = (2.0f64.exp() / (1.0 + 2.0f64.exp())) as f32 as f64;
        let routed = silu(1.0) * 2.0;
        let shared = silu(2.0) * 1.0;
        let want = [
            stored(
                stored(w * 2.0 * stored(routed, DType::F32), DType::F32) + shared,
                DType::F32,
            ),
            stored(w * routed, DType::F32),
        ];
        for (a, b) in r.out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?} vs {want:?}", r.out);
        }
    }

    #[test]
    fn invalid_layers_are_errors_not_panics() {
        let hidden = Tensor::f32(&[1, 2], vec![1.0, 2.0]).unwrap();
        let gate = Tensor::f32(&[2, 2], vec![0.0; 4]).unwrap();
        let gate_up = Tensor::f32(&[2, 2, 2], vec![0.0; 8]).unwrap();
        let down = Tensor::f32(&[2, 2, 1], vec![0.0; 4]).unwrap();
        let shared_gate_up = Tensor::f32(&[1, 2, 2], vec![0.0; 4]).unwrap();
        let shared_down = Tensor::f32(&[1, 2, 1], vec![0.0; 2]).unwrap();
        let short_bias = Tensor::f32(&[1], vec![0.0]).unwrap();
        let small_down = Tensor::f32(&[2, 1, 1], vec![0.0; 2]).unwrap();
        let weights = HostWeights {
            gate: &gate,
            bias: None,
            router_scale: None,
            gate_up: &gate_up,
            down: &down,
            shared: Some((&shared_gate_up, &shared_down)),
        };
        assert!(layer(&tiny(), &hidden, &weights, DType::F32).is_ok());
        let mut no_groups = tiny();
        no_groups.router.groups = 0;
        let mut too_many = tiny();
        too_many.router.top_k = 3;
        for config in [no_groups, too_many] {
            assert!(layer(&config, &hidden, &weights, DType::F32).is_err());
        }
        let bad_bias = HostWeights {
            bias: Some(&short_bias),
            ..weights
        };
        let bad_down = HostWeights {
            down: &small_down,
            ..weights
        };
        for w in [bad_bias, bad_down] {
            assert!(layer(&tiny(), &hidden, &w, DType::F32).is_err());
        }
    }

    #[test]
    fn intermediates_round_to_the_activation_dtype() {
        let config = tiny();
        let hidden = Tensor::from_f32(&[1, 2], &[1.0, 1.0], DType::BF16).unwrap();
        let gate_up =
            Tensor::from_f32(&[1, 2, 2], &[1.0, 0.0, 0.0, 1.0 / 3.0], DType::BF16).unwrap();
        let down = Tensor::from_f32(&[1, 2, 1], &[1.0, 1.0], DType::BF16).unwrap();
        let y = expert_mlp(&config, &hidden, &gate_up, &down, None).unwrap();
        // silu(1) · bf16(1/3), rounded to bf16, times 1, rounded to bf16.
        let up = DType::BF16.round(1.0 / 3.0) as f64;
        let inter = stored(silu(1.0) * up, DType::BF16);
        assert_eq!(y, vec![inter, inter]);
        assert_ne!(inter, silu(1.0) * up, "the rounding is visible");
    }

    #[test]
    fn expert_slices_and_row_selection() {
        let w = Tensor::f32(&[3, 1, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(w.expert(1).unwrap().to_f32(), vec![2.0, 3.0]);
        assert!(w.expert(3).is_err());
        let x = Tensor::f32(&[3, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(
            select_rows(&x, &[2, 0]).unwrap().to_f32(),
            vec![4.0, 5.0, 0.0, 1.0]
        );
    }
}
