//! The unfused baseline: the same steps as the fused router, one kernel each, with every
//! intermediate (logits, scores, choice keys, kept groups, block counts) going through global
//! memory — what a framework without the fused operator would run. It writes the router's own
//! outputs, so it is checked against the same reference.

use super::dispatch::{LAYOUT, LAYOUT_WG, Launch, SCATTER, histogram_launch, scatter_constants};
use super::route::{ROUTE, RoutePlan, Router, route_constants};
use super::{OP, Selection};
use crate::error::Result;
use crate::gpu::{Gpu, Recorder};

/// The unfused chain of a [`Router`]: gate (fused-gate inputs only), scores, group choice
/// (group-limited only), top-k, weights, histogram, per-expert scan, offsets, scatter, padding
/// fill and imbalance, each its own dispatch.
pub struct UnfusedChain {
    steps: Vec<Launch>,
    _buffers: Vec<wgpu::Buffer>,
}

impl UnfusedChain {
    pub(crate) fn new(gpu: &Gpu, router: &Router) -> Result<Self> {
        if router.tokens() == 0 {
            // An empty batch: the router records nothing, and neither does its baseline.
            return Ok(UnfusedChain {
                steps: Vec::new(),
                _buffers: Vec::new(),
            });
        }
        let config = router.config();
        let (plan, inputs, params) = router.parts();
        let (routing, layout) = (router.routing(), router.layout());
        let (t, e, g) = (router.tokens(), config.experts, config.groups);
        // Workgroup-memory reductions and one token per workgroup, as a plain chain would have.
        let plain = RoutePlan {
            subgroups: false,
            tile: 1,
            ..*plan
        };
        let constants = route_constants(config, &plain, inputs);
        let wg = plain.wg;
        for (what, elements) in [("staged scores", t * e), ("staged kept", t * g)] {
            gpu.check_binding(what, 4 * elements as u64)?;
        }
        let fused_gate = inputs.hidden.is_some();
        // The gate's output; a placeholder when the chain starts from logits.
        let logits_elements = if fused_gate { t * e } else { 1 };
        let staged_logits = gpu.storage_buffer("staged logits", 4 * logits_elements as u64)?;
        let staged_scores = gpu.storage_buffer("staged scores", 4 * (t * e) as u64)?;
        let staged_keys = gpu.storage_buffer("staged keys", 4 * (t * e) as u64)?;
        let staged_kept = gpu.storage_buffer("staged kept", 4 * (t * g) as u64)?;
        let route_step = |entry: &'static str, bindings: &[u32], workgroups: u32| {
            let entries: Vec<(u32, wgpu::BindingResource)> = bindings
                .iter()
                .map(|&b| {
                    let resource = match b {
                        0 => inputs.scores.as_entire_binding(),
                        1 => inputs.gate_weight.as_entire_binding(),
                        2 => inputs.bias(),
                        3 => inputs.router_scale(),
                        4 => routing.topk_ids.binding(),
                        5 => routing.topk_weights.binding(),
                        7 => params.as_entire_binding(),
                        8 => staged_logits.as_entire_binding(),
                        9 => staged_scores.as_entire_binding(),
                        10 => staged_keys.as_entire_binding(),
                        _ => staged_kept.as_entire_binding(),
                    };
                    (b, resource)
                })
                .collect();
            Launch::new(gpu, &ROUTE, entry, &constants, &entries, workgroups)
        };
        let tokens = t as u32;
        let mut steps = Vec::new();
        if fused_gate {
            steps.push(route_step(
                "staged_gate",
                &[0, 1, 7, 8],
                (tokens * e as u32).div_ceil(wg),
            )?);
        }
        steps.push(route_step("staged_score", &[0, 2, 7, 8, 9, 10], tokens)?);
        if matches!(config.selection, Selection::GroupLimited { k_group, .. } if k_group < g) {
            steps.push(route_step("staged_groups", &[7, 9, 10, 11], tokens)?);
        }
        steps.push(route_step("staged_topk", &[4, 5, 7, 9, 10, 11], tokens)?);
        steps.push(route_step(
            "staged_weights",
            &[3, 4, 5, 7],
            tokens.div_ceil(wg),
        )?);

        let scatter_params = gpu.uniform(&layout.scatter_params())?;
        let layout_params = gpu.uniform(&layout.layout_params())?;
        steps.push(histogram_launch(
            gpu,
            layout,
            &routing.topk_ids,
            &scatter_params,
        )?);
        let layout_constants = [("WG", LAYOUT_WG as f64), ("E", e as f64), ("G", g as f64)];
        let layout_step = |entry: &'static str, bindings: &[u32], workgroups: u32| {
            let entries: Vec<(u32, wgpu::BindingResource)> = bindings
                .iter()
                .map(|&b| {
                    let resource = match b {
                        0 => layout.block_counts.binding(),
                        1 => layout.counts.binding(),
                        2 => layout.offsets.binding(),
                        3 => layout.sorted_slots.binding(),
                        4 => layout.block_experts.binding(),
                        5 => layout.group_loads.binding(),
                        6 => layout.imbalance.binding(),
                        _ => layout_params.as_entire_binding(),
                    };
                    (b, resource)
                })
                .collect();
            Launch::new(gpu, &LAYOUT, entry, &layout_constants, &entries, workgroups)
        };
        steps.push(layout_step(
            "staged_expert_scan",
            &[0, 1, 7],
            (e as u32).div_ceil(LAYOUT_WG),
        )?);
        steps.push(layout_step("staged_offsets", &[1, 2, 7], 1)?);
        steps.push(Launch::new(
            gpu,
            &SCATTER,
            "scatter",
            &scatter_constants(layout),
            &[
                (0, routing.topk_ids.binding()),
                (1, layout.block_counts.binding()),
                (2, layout.offsets.binding()),
                (3, layout.sorted_slots.binding()),
                (4, layout.slot_rows.binding()),
                (5, layout.block_experts.binding()),
                (6, scatter_params.as_entire_binding()),
            ],
            layout.block_counts.shape()[0] as u32,
        )?);
        steps.push(layout_step(
            "staged_fill",
            &[1, 2, 3, 4, 7],
            (layout.rows() as u32).div_ceil(LAYOUT_WG),
        )?);
        steps.push(layout_step("staged_imbalance", &[1, 5, 6, 7], 1)?);
        Ok(UnfusedChain {
            steps,
            _buffers: vec![
                staged_logits,
                staged_scores,
                staged_keys,
                staged_kept,
                scatter_params,
                layout_params,
            ],
        })
    }

    /// Number of kernel dispatches.
    pub fn dispatches(&self) -> usize {
        self.steps.len()
    }

    /// Record every step, in order, into one compute pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let mut pass = rec.compute_pass(&format!("{OP} unfused"));
        for step in &self.steps {
            step.record(&mut pass);
        }
        Ok(())
    }
}
