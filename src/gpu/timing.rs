//! Recording and timing. Operators record their dispatches through a [`Recorder`], which opens
//! compute passes on the caller's command encoder; when timing, each pass gets GPU timestamps at
//! its start and end, so one operator may use several passes and several operators may share one
//! submission.

use std::time::Instant;

use super::Gpu;
use crate::error::{Error, Result};

/// Largest query set wgpu allows.
const MAX_QUERIES: u32 = 4096;

/// Records compute passes into a command encoder, timestamping them when asked to.
pub struct Recorder<'a> {
    encoder: &'a mut wgpu::CommandEncoder,
    stamps: Option<Stamps<'a>>,
    labels: Vec<String>,
}

struct Stamps<'a> {
    set: &'a wgpu::QuerySet,
    next: u32,
    end: u32,
}

impl<'a> Recorder<'a> {
    /// A recorder without timestamps.
    pub fn new(encoder: &'a mut wgpu::CommandEncoder) -> Self {
        Recorder {
            encoder,
            stamps: None,
            labels: Vec::new(),
        }
    }

    fn timed(
        encoder: &'a mut wgpu::CommandEncoder,
        set: &'a wgpu::QuerySet,
        slots: (u32, u32),
    ) -> Self {
        Recorder {
            encoder,
            stamps: Some(Stamps {
                set,
                next: slots.0,
                end: slots.1,
            }),
            labels: Vec::new(),
        }
    }

    /// Begin a compute pass. Dispatches inside one pass are ordered by wgpu's usage tracking
    /// (a storage write is visible to the next dispatch), so an operator may chain kernels here.
    pub fn compute_pass(&mut self, label: &str) -> wgpu::ComputePass<'_> {
        self.labels.push(label.to_string());
        let timestamp_writes = match &mut self.stamps {
            Some(s) if s.next + 2 <= s.end => {
                let begin = s.next;
                s.next += 2;
                Some(wgpu::ComputePassTimestampWrites {
                    query_set: s.set,
                    beginning_of_pass_write_index: Some(begin),
                    end_of_pass_write_index: Some(begin + 1),
                })
            }
            _ => None,
        };
        self.encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes,
            })
    }

    /// The underlying encoder, for copies and clears between passes.
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder
    }

    /// Labels of the passes recorded so far.
    pub fn pass_labels(&self) -> &[String] {
        &self.labels
    }
}

/// Which clock a [`Timing`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clock {
    /// GPU timestamps at the boundaries of the operator's compute passes.
    GpuTimestamps,
    /// Host wall clock around submit + wait of each iteration (no timestamp support): includes
    /// submission overhead.
    WallClock,
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Clock::GpuTimestamps => "gpu-timestamps",
            Clock::WallClock => "wall-clock",
        })
    }
}

/// Times of N iterations of one recording.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub clock: Clock,
    /// Nanoseconds per iteration, in run order.
    pub samples_ns: Vec<f64>,
    /// Labels of the compute passes of one iteration.
    pub pass_labels: Vec<String>,
    /// Median nanoseconds per pass (GPU timestamps only; empty otherwise).
    pub pass_median_ns: Vec<f64>,
}

/// Median of a non-empty slice (NaN for an empty one).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

impl Timing {
    pub fn median_ns(&self) -> f64 {
        median(&self.samples_ns)
    }
    pub fn min_ns(&self) -> f64 {
        self.samples_ns
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }
    pub fn max_ns(&self) -> f64 {
        self.samples_ns.iter().copied().fold(0.0, f64::max)
    }
}

impl Gpu {
    /// Time `record`: `warmup` untimed iterations, then `iters` timed ones. Uses GPU timestamps
    /// around each compute pass when the device has them (the resolve goes in its own submission,
    /// see wgpu issue 6406), the host wall clock otherwise; [`Timing::clock`] says which.
    pub fn time(
        &self,
        warmup: usize,
        iters: usize,
        mut record: impl FnMut(&mut Recorder) -> Result<()>,
    ) -> Result<Timing> {
        let iters = iters.max(1);
        // Warm-up also tells how many passes one iteration records.
        let mut labels = Vec::new();
        for _ in 0..warmup.max(1) {
            labels = self.checked(|| -> Result<Vec<String>> {
                let mut encoder = self.encoder();
                let labels = {
                    let mut rec = Recorder::new(&mut encoder);
                    record(&mut rec)?;
                    rec.labels
                };
                self.queue.submit([encoder.finish()]);
                Ok(labels)
            })??;
            self.wait()?;
        }
        let passes = labels.len() as u32;
        if passes == 0 {
            return Err(Error::invalid(
                "timing",
                "recording",
                "it recorded no compute pass",
            ));
        }
        if self.caps.timestamps && 2 * passes <= MAX_QUERIES {
            self.time_with_timestamps(iters, passes, labels, &mut record)
        } else {
            self.time_with_wall_clock(iters, labels, &mut record)
        }
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }

    fn time_with_timestamps(
        &self,
        iters: usize,
        passes: u32,
        labels: Vec<String>,
        record: &mut impl FnMut(&mut Recorder) -> Result<()>,
    ) -> Result<Timing> {
        let per_iter = 2 * passes;
        let batch = (MAX_QUERIES / per_iter).max(1) as usize;
        let capacity = per_iter * batch.min(iters) as u32;
        let (set, resolve) = self.checked(|| {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: capacity,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp resolve"),
                size: capacity as u64 * 8,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (set, resolve)
        })?;
        let period = self.queue.get_timestamp_period() as f64;
        let mut samples = Vec::with_capacity(iters);
        let mut per_pass: Vec<Vec<f64>> = vec![Vec::new(); passes as usize];
        let mut done = 0;
        while done < iters {
            let n = batch.min(iters - done);
            let used = per_iter * n as u32;
            self.checked(|| -> Result<()> {
                let mut encoder = self.encoder();
                for i in 0..n as u32 {
                    let slots = (i * per_iter, (i + 1) * per_iter);
                    let mut rec = Recorder::timed(&mut encoder, &set, slots);
                    record(&mut rec)?;
                    if rec.labels.len() as u32 != passes {
                        return Err(Error::invalid(
                            "timing",
                            "recording",
                            "the number of compute passes changed between iterations",
                        ));
                    }
                }
                self.queue.submit([encoder.finish()]);
                // Resolve only the slots written (unwritten slots can stall the resolve).
                let mut encoder = self.encoder();
                encoder.resolve_query_set(&set, 0..used, &resolve, 0);
                self.queue.submit([encoder.finish()]);
                Ok(())
            })??;
            let bytes = self.read_bytes(&resolve, used as u64 * 8)?;
            let ticks: &[u64] = bytemuck::cast_slice(&bytes);
            for i in 0..n {
                let t = &ticks[i * per_iter as usize..(i + 1) * per_iter as usize];
                let (first, last) = (t[0], t[t.len() - 1]);
                if first == 0 || last < first {
                    return Err(Error::Device(format!(
                        "timestamps unusable (begin {first}, end {last})"
                    )));
                }
                samples.push((last - first) as f64 * period);
                for (p, pair) in t.chunks_exact(2).enumerate() {
                    per_pass[p].push(pair[1].saturating_sub(pair[0]) as f64 * period);
                }
            }
            done += n;
        }
        Ok(Timing {
            clock: super::Clock::GpuTimestamps,
            samples_ns: samples,
            pass_labels: labels,
            pass_median_ns: per_pass.iter().map(|v| median(v)).collect(),
        })
    }

    fn time_with_wall_clock(
        &self,
        iters: usize,
        labels: Vec<String>,
        record: &mut impl FnMut(&mut Recorder) -> Result<()>,
    ) -> Result<Timing> {
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = Instant::now();
            self.checked(|| -> Result<()> {
                let mut encoder = self.encoder();
                record(&mut Recorder::new(&mut encoder))?;
                self.queue.submit([encoder.finish()]);
                Ok(())
            })??;
            self.wait()?;
            samples.push(start.elapsed().as_nanos() as f64);
        }
        Ok(Timing {
            clock: super::Clock::WallClock,
            samples_ns: samples,
            pass_labels: labels,
            pass_median_ns: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
