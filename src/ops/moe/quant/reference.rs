//! CPU reference of the W8A8 layer: the 16-bit layer's reference ([`super::super::reference`])
//! with every quantization step emulated exactly where the GPU makes it:
//!
//! 1. each token's hidden row quantized per row ([`crate::ops::quantize::reference`], bit-exact
//!    with the GPU's);
//! 2. gate/up as exact integer sums, dequantized (`acc · x_scale · w_scale`), SwiGLU in f64,
//!    stored in the activation dtype;
//! 3. that intermediate re-quantized per row;
//! 4. down as exact integer sums, dequantized, times the routing weight (f32), stored in the
//!    activation dtype; the shared expert likewise (without the routing weight);
//! 5. the sum per token, then the output dtype.
//!
//! What remains between the two is the f32 arithmetic of the dequantization and of SwiGLU
//! against f64: an intermediate that lands on the other side of a rounding boundary (of the
//! activation dtype, or of the re-quantization) moves one int8 step of one term.

use super::super::reference::{
    ExpertSource, Experts, LayerRef, check_token_inputs, routing, stored, sum_token_outputs,
};
use super::super::{MoeConfig, OP};
use super::{QuantHostWeights, check_host};
use crate::error::{Error, Result};
use crate::ops::merrouter::reference::{self as router_ref, RoutingRef};
use crate::ops::quantize::reference::quantize;
use crate::ops::swiftgmm::quant::{QuantInputs, reference::grouped_matmul};
use crate::ops::swiftgmm::{Activation, Groups, Options};
use crate::tensor::{DType, Tensor};

/// int8 experts (from any source) and their per-output-channel scales `[e, n]` f32.
pub type QuantSource<'a> = (&'a dyn ExpertSource, &'a Tensor);

/// A W8A8 layer's experts, wherever the int8 weights come from.
#[derive(Clone, Copy)]
pub struct QuantExperts<'a> {
    pub gate_up: QuantSource<'a>,
    pub down: QuantSource<'a>,
    /// `(gate_up, down)` of the shared expert (one expert each).
    pub shared: Option<(QuantSource<'a>, QuantSource<'a>)>,
}

impl<'a> QuantExperts<'a> {
    /// The experts of host weights.
    pub fn of(weights: &QuantHostWeights<'a>) -> Self {
        let pair = |w: super::QuantTensor<'a>| (w.q as &dyn ExpertSource, w.scale);
        QuantExperts {
            gate_up: pair(weights.gate_up),
            down: pair(weights.down),
            shared: weights.shared.map(|(g, d)| (pair(g), pair(d))),
        }
    }

    /// The int8 sources alone (for the 16-bit layer's checks).
    fn sources(&self) -> Experts<'a> {
        Experts {
            gate_up: self.gate_up.0,
            down: self.down.0,
            shared: self.shared.map(|(g, d)| (g.0, d.0)),
        }
    }
}

/// Row `e` of a `[e, n]` scale as `[1, n]`.
fn scale_row(scale: &Tensor, e: usize) -> Result<Tensor> {
    let &[experts, n] = scale.shape() else {
        return Err(Error::shape(
            OP,
            "expert weight scale",
            scale.shape(),
            "[e, n]",
        ));
    };
    if e >= experts {
        return Err(Error::invalid(
            OP,
            "expert",
            format!("{e} is not in 0..{experts}"),
        ));
    }
    Tensor::f32(&[1, n], scale.to_f32()[e * n..(e + 1) * n].to_vec())
}

/// One expert MLP in W8A8 over the rows `x [n, h]` (activation dtype): quantize, gate/up with
/// SwiGLU stored in the activation dtype, re-quantize, down times `scale[row]` stored in the
/// activation dtype. `gate_up`, `down`: one expert's int8 weights `[1, a, b]` and scale `[1, n]`.
fn expert_mlp(
    config: &MoeConfig,
    x: &Tensor,
    gate_up: (&Tensor, &Tensor),
    down: (&Tensor, &Tensor),
    scale: Option<Vec<f32>>,
) -> Result<Vec<f64>> {
    let act = x.dtype();
    let n = x.shape()[0];
    let groups = Groups::Counts(vec![n as u32]);
    let options = |activation| Options {
        layout: config.layout,
        activation,
        ..Options::default()
    };
    let qx = quantize(x)?;
    let inter = grouped_matmul(
        &QuantInputs {
            x: &qx.q,
            x_scale: Some(&qx.scale),
            groups: &groups,
            w: gate_up.0,
            w_scale: gate_up.1,
            w_offset: None,
            row_scale: None,
        },
        &options(Activation::SwiGlu),
    )?;
    let inter: Vec<f32> = inter.iter().map(|&v| stored(v, act) as f32).collect();
    let inter = Tensor::from_f32(&[n, inter.len() / n.max(1)], &inter, act)?;
    let qi = quantize(&inter)?;
    let scale = scale.map(|s| Tensor::f32(&[n], s)).transpose()?;
    let y = grouped_matmul(
        &QuantInputs {
            x: &qi.q,
            x_scale: Some(&qi.scale),
            groups: &groups,
            w: down.0,
            w_scale: down.1,
            w_offset: None,
            row_scale: scale.as_ref(),
        },
        &options(Activation::None),
    )?;
    Ok(y.iter().map(|&v| stored(v, act)).collect())
}

/// The W8A8 layer output of the tokens `tokens` (in that order), `[tokens.len(), h]`, given the
/// routing of all tokens (as the 16-bit [`super::super::reference::token_outputs`]).
pub fn token_outputs(
    config: &MoeConfig,
    hidden: &Tensor,
    routing: &RoutingRef,
    experts: &QuantExperts<'_>,
    tokens: &[usize],
    out_dtype: DType,
) -> Result<Vec<f64>> {
    check_token_inputs(config, hidden, routing, &experts.sources(), out_dtype)?;
    let shared = experts.shared.is_some();
    sum_token_outputs(
        config,
        hidden,
        routing,
        tokens,
        out_dtype,
        shared,
        |x, expert, s| match (expert, experts.shared) {
            (Some(e), _) => expert_mlp(
                config,
                x,
                (
                    &experts.gate_up.0.expert(e)?,
                    &scale_row(experts.gate_up.1, e)?,
                ),
                (&experts.down.0.expert(e)?, &scale_row(experts.down.1, e)?),
                s,
            ),
            (None, Some((g, d))) => expert_mlp(
                config,
                x,
                (&g.0.expert(0)?, &scale_row(g.1, 0)?),
                (&d.0.expert(0)?, &scale_row(d.1, 0)?),
                None,
            ),
            (None, None) => Err(Error::invalid(OP, "shared expert", "none")),
        },
    )
}

/// The whole W8A8 layer for host tensors (as [`super::super::reference::layer`]).
pub fn layer(
    config: &MoeConfig,
    hidden: &Tensor,
    weights: &QuantHostWeights<'_>,
    out_dtype: DType,
) -> Result<LayerRef> {
    let t = check_host(config, hidden, weights, out_dtype)?;
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
        &QuantExperts::of(weights),
        &tokens,
        out_dtype,
    )?;
    Ok(LayerRef {
        routing,
        layout,
        out,
    })
}
