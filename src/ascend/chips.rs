//! The Ascend chips a plan can target: core counts, on-chip memory sizes, the features the
//! operators depend on, and (where a public figure exists) peak cube throughput and memory
//! bandwidth. Every number here is cited in [`ChipSpec::sources`] and in `docs/ascend/README.md`,
//! whose chip table is [`markdown_table`] verbatim (a test keeps the two equal).

use serde::Serialize;

use crate::error::{Error, Result};

/// How cube and vector units are arranged on a chip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CoreArch {
    /// Atlas A2: separate cube cores (AIC) and vector cores (AIV), one AIC paired with two AIV.
    /// They share no on-chip memory: data moves between them through global memory (workspace).
    Separated,
    /// Atlas inference products (310P): each AI core holds both the cube and the vector unit, and
    /// cube results reach the Unified Buffer on chip (L0C -> UB).
    Coupled,
}

/// One on-chip memory of an AI core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Memory {
    /// Unified Buffer: vector (and scalar) operands.
    #[serde(rename = "UB")]
    Ub,
    /// L1 buffer: cube operand staging.
    L1,
    /// L0A: left cube operand.
    L0A,
    /// L0B: right cube operand.
    L0B,
    /// L0C: cube accumulator.
    L0C,
}

impl Memory {
    pub const ALL: [Memory; 5] = [
        Memory::L1,
        Memory::L0A,
        Memory::L0B,
        Memory::L0C,
        Memory::Ub,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Memory::Ub => "UB",
            Memory::L1 => "L1",
            Memory::L0A => "L0A",
            Memory::L0B => "L0B",
            Memory::L0C => "L0C",
        }
    }

    /// Start-address alignment Ascend C requires in this memory, in bytes (Ascend C API
    /// reference, "General Restrictions", table 2).
    pub fn alignment(self) -> u64 {
        match self {
            Memory::Ub | Memory::L1 => 32,
            Memory::L0A | Memory::L0B => 512,
            Memory::L0C => 64,
        }
    }
}

/// What a chip can and cannot do, as far as the three operators care.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Features {
    /// bf16 tensors (data, cube input, DMA atomics).
    pub bf16: bool,
    /// int32 atomic add on DMA copies to global memory (AMLA's in-GM exponent update, counts).
    pub int32_atomic_add: bool,
    /// Atomic accumulation straight from L0C into global memory (Fixpipe path).
    pub l0c_atomic_to_gm: bool,
    /// The Sort32 / MrgSort vector sort instructions.
    pub sort32: bool,
}

/// Where a chip's fp16 cube peak comes from.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CubePeak {
    /// A public figure for the whole chip, TFLOP/s.
    Public { tflops: f64, basis: &'static str },
    /// An estimate: cube cores x 4096 fp16 MACs per cycle x 2 FLOP x a published clock.
    Estimate { clock_ghz: f64, basis: &'static str },
}

/// One target chip.
#[derive(Clone, Debug, Serialize)]
pub struct ChipSpec {
    /// Short name used on the command line (`910B2`).
    pub name: &'static str,
    /// CANN SoC version string (`Ascend910B2`).
    pub soc_version: &'static str,
    /// Product family the Ascend C documentation uses for this chip.
    pub product: &'static str,
    pub arch: CoreArch,
    /// Cube cores (AIC) on A2; AI cores (cube + vector) on 310P.
    pub cube_cores: u32,
    /// Vector units the plans schedule: AIV on A2 (two per AIC); the AI cores' own on 310P.
    pub vector_cores: u32,
    /// Unified Buffer per vector core, bytes.
    pub ub_bytes: u64,
    pub l1_bytes: u64,
    pub l0a_bytes: u64,
    pub l0b_bytes: u64,
    pub l0c_bytes: u64,
    pub features: Features,
    /// The fp16 cube peak, public or estimated (the caller's `peak_tflops=` wins).
    pub cube_peak: CubePeak,
    /// Off-chip memory bandwidth of the whole chip and its source, where a public figure with a
    /// traceable source exists; `None` means the bound needs `mem_gbps=` from the caller.
    pub public_mem_gbps: Option<(f64, &'static str)>,
    /// Public sources for the numbers above.
    pub sources: &'static [&'static str],
}

impl ChipSpec {
    /// Capacity of one memory on one core, bytes.
    pub fn capacity(&self, memory: Memory) -> u64 {
        match memory {
            Memory::Ub => self.ub_bytes,
            Memory::L1 => self.l1_bytes,
            Memory::L0A => self.l0a_bytes,
            Memory::L0B => self.l0b_bytes,
            Memory::L0C => self.l0c_bytes,
        }
    }

    /// The fp16 cube peak of the whole chip in TFLOP/s and where it comes from.
    pub fn cube_peak(&self) -> Option<(f64, String)> {
        match self.cube_peak {
            CubePeak::Public { tflops, basis } => Some((tflops, format!("public figure: {basis}"))),
            CubePeak::Estimate { clock_ghz, basis } => {
                let tflops =
                    f64::from(self.cube_cores) * CUBE_FP16_MACS_PER_CYCLE * 2.0 * clock_ghz / 1e3;
                Some((
                    tflops,
                    format!(
                        "estimate, not a vendor figure: {} cube cores x {} fp16 MACs/cycle x 2 \
                         FLOP x {clock_ghz} GHz ({basis})",
                        self.cube_cores, CUBE_FP16_MACS_PER_CYCLE
                    ),
                ))
            }
        }
    }

    /// Vector cores that work beside one cube core in a mixed (cube + vector) kernel.
    pub fn vector_per_cube(&self) -> u32 {
        match self.arch {
            CoreArch::Separated => self.vector_cores / self.cube_cores,
            CoreArch::Coupled => 1,
        }
    }
}

const KIB: u64 = 1024;

/// fp16 multiply-accumulates of one cube per cycle (16 x 16 x 16); int8 does twice as many
/// (Hot Chips 2019, see the sources).
pub const CUBE_FP16_MACS_PER_CYCLE: f64 = 4096.0;

/// The basis of the A2 cube estimate.
const A2_CLOCK_BASIS: &str = "1.8 GHz: the rated AI-core frequency a catlass tuner run reports \
     on an Atlas A2 board, hicann/catlass tools/tuner/README.md; the same clock is assumed for \
     910B4";

const A2_SOURCES: &[&str] = &[
    "hicann/ops-transformer tests/ut/framework_special/utils/src/platform.cpp (Ascend910B2: \
     cube_core_cnt 24, vector_core_cnt 48, L0A/L0B 65536, L0C 131072, L1 524288, UB 196608)",
    "hicann/catlass include/catlass/arch/arch.hpp (AtlasA2: UB 192 KiB, L1 512 KiB, L0A/L0B \
     64 KiB, L0C 128 KiB)",
    "Project-HAMi/HAMi charts/hami/templates/scheduler/device-configmap.yaml (910B2: aiCore 24, \
     64 GiB; 910B4: aiCore 20, 32 GiB)",
    "Ascend C API, GetBlockIdx: AIC:AIV = 1:2 in mixed kernels \
     https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/910beta2/API/ascendcopapi/atlasascendc_api_07_0185.html",
    "Ascend C API, SetAtomicType: A2 atomics int8/int16/half/bfloat16/int32/float \
     https://www.hiascend.com/document/detail/en/canncommercial/latest/API/ascendcopapi/atlasascendc_api_07_0211.html",
    "hicann/catlass tools/tuner/README.md (a tuner run prints 'rated freq 1800' for the AI core)",
    "Da Vinci cube: 4096 fp16 MACs or 8192 int8 MACs per cycle (Hot Chips 2019, summarised at \
     https://vengineer.hatenablog.com/entry/2019/09/06/070000)",
];

const P310_SOURCES: &[&str] = &[
    "hicann/ops-transformer tests/ut/framework_special/utils/src/platform.cpp (Ascend310P3: \
     ai_core_cnt 8, L0A/L0B 65536, L0C 262144, L1 1048576, UB 262144)",
    "Project-HAMi/HAMi charts/hami/templates/scheduler/device-configmap.yaml (310P3: aiCore 8)",
    "Ascend C API, SetAtomicType: Atlas inference AI Core atomics int16/half/float only \
     https://www.hiascend.com/document/detail/en/canncommercial/latest/API/ascendcopapi/atlasascendc_api_07_0211.html",
    "Ascend C API, Sort32: not supported on Atlas inference AI Core \
     https://www.hiascend.com/document/detail/zh/canncommercial/850/API/ascendcopapi/atlasascendc_api_07_0231.html",
    "vLLM Ascend, Atlas 300I series: float16 only \
     https://docs.vllm.ai/projects/ascend/en/v0.11.0/tutorials/single_node_300i.html",
    "Atlas 300I Duo (two 310P chips): 408 GB/s LPDDR4X, 280 TOPS INT8 per card \
     https://avalanchenoticias.com.br/servidores-clusters-supercomputadores-computadores-industriais-e-multiprocessadores/o-acelerador-huawei-atlas-300i-duo-e-equipado-com-um-par-de-chips-ascend-310-ai",
    "Da Vinci cube: 4096 fp16 MACs or 8192 int8 MACs per cycle (Hot Chips 2019, summarised at \
     https://vengineer.hatenablog.com/entry/2019/09/06/070000)",
];

const A2_FEATURES: Features = Features {
    bf16: true,
    int32_atomic_add: true,
    l0c_atomic_to_gm: true,
    sort32: true,
};

/// The chips `ascend-plan` knows.
pub static CHIPS: [ChipSpec; 3] = [
    ChipSpec {
        name: "910B2",
        soc_version: "Ascend910B2",
        product: "Atlas A2 (800I A2 / 800T A2)",
        arch: CoreArch::Separated,
        cube_cores: 24,
        vector_cores: 48,
        ub_bytes: 192 * KIB,
        l1_bytes: 512 * KIB,
        l0a_bytes: 64 * KIB,
        l0b_bytes: 64 * KIB,
        l0c_bytes: 128 * KIB,
        features: A2_FEATURES,
        cube_peak: CubePeak::Estimate {
            clock_ghz: 1.8,
            basis: A2_CLOCK_BASIS,
        },
        public_mem_gbps: None,
        sources: A2_SOURCES,
    },
    ChipSpec {
        name: "910B4",
        soc_version: "Ascend910B4",
        product: "Atlas A2 (800I A2)",
        arch: CoreArch::Separated,
        cube_cores: 20,
        vector_cores: 40,
        ub_bytes: 192 * KIB,
        l1_bytes: 512 * KIB,
        l0a_bytes: 64 * KIB,
        l0b_bytes: 64 * KIB,
        l0c_bytes: 128 * KIB,
        features: A2_FEATURES,
        cube_peak: CubePeak::Estimate {
            clock_ghz: 1.8,
            basis: A2_CLOCK_BASIS,
        },
        public_mem_gbps: None,
        sources: A2_SOURCES,
    },
    ChipSpec {
        name: "310P3",
        soc_version: "Ascend310P3",
        product: "Atlas inference (300I Duo: two 310P3 per card)",
        arch: CoreArch::Coupled,
        cube_cores: 8,
        vector_cores: 8,
        ub_bytes: 256 * KIB,
        l1_bytes: 1024 * KIB,
        l0a_bytes: 64 * KIB,
        l0b_bytes: 64 * KIB,
        l0c_bytes: 256 * KIB,
        features: Features {
            bf16: false,
            int32_atomic_add: false,
            l0c_atomic_to_gm: false,
            sort32: false,
        },
        cube_peak: CubePeak::Public {
            tflops: 70.0,
            basis: "the Atlas 300I Duo card's 280 TOPS INT8 for two chips, halved per chip; \
                    fp16 = int8 / 2 because the cube does 8192 int8 or 4096 fp16 MACs per cycle",
        },
        public_mem_gbps: Some((
            204.0,
            "public figure: the Atlas 300I Duo card's 408 GB/s LPDDR4X for two chips, halved \
             per chip",
        )),
        sources: P310_SOURCES,
    },
];

/// The chip called `name` (`910B2`, `Ascend910B2`, any case).
pub fn chip(name: &str) -> Result<&'static ChipSpec> {
    let wanted = name.trim().to_ascii_lowercase();
    CHIPS
        .iter()
        .find(|c| {
            c.name.to_ascii_lowercase() == wanted || c.soc_version.to_ascii_lowercase() == wanted
        })
        .ok_or_else(|| Error::Format {
            what: "--chip".into(),
            why: format!(
                "unknown chip {name:?}; known: {:?}",
                CHIPS.iter().map(|c| c.name).collect::<Vec<_>>()
            ),
        })
}

fn kib(bytes: u64) -> String {
    format!("{} KiB", bytes / KIB)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The chip table of `docs/ascend/README.md`, generated from [`CHIPS`].
pub fn markdown_table() -> String {
    let mut rows: Vec<(&str, Vec<String>)> = vec![
        (
            "SoC version",
            CHIPS.iter().map(|c| c.soc_version.to_string()).collect(),
        ),
        (
            "architecture",
            CHIPS
                .iter()
                .map(|c| match c.arch {
                    CoreArch::Separated => "separated AIC + AIV".to_string(),
                    CoreArch::Coupled => "coupled AI core".to_string(),
                })
                .collect(),
        ),
        (
            "cube / vector cores",
            CHIPS
                .iter()
                .map(|c| format!("{} / {}", c.cube_cores, c.vector_cores))
                .collect(),
        ),
        (
            "UB per vector core",
            CHIPS.iter().map(|c| kib(c.ub_bytes)).collect(),
        ),
        ("L1", CHIPS.iter().map(|c| kib(c.l1_bytes)).collect()),
        (
            "L0A / L0B / L0C",
            CHIPS
                .iter()
                .map(|c| {
                    format!(
                        "{} / {} / {} KiB",
                        c.l0a_bytes / KIB,
                        c.l0b_bytes / KIB,
                        c.l0c_bytes / KIB
                    )
                })
                .collect(),
        ),
        (
            "L0C results leave by",
            CHIPS
                .iter()
                .map(|c| match c.arch {
                    CoreArch::Separated => "Fixpipe (to GM)".to_string(),
                    CoreArch::Coupled => "DataCopy CO1 -> CO2 (to UB)".to_string(),
                })
                .collect(),
        ),
        (
            "UB -> L1 copy",
            CHIPS
                .iter()
                .map(|c| match c.arch {
                    CoreArch::Separated => "no (AIV and AIC share no memory)".to_string(),
                    CoreArch::Coupled => "yes (VECOUT -> A1/B1)".to_string(),
                })
                .collect(),
        ),
        (
            "bf16",
            CHIPS
                .iter()
                .map(|c| yes_no(c.features.bf16).into())
                .collect(),
        ),
        (
            "int32 DMA atomic add",
            CHIPS
                .iter()
                .map(|c| yes_no(c.features.int32_atomic_add).into())
                .collect(),
        ),
        (
            "L0C -> GM atomic",
            CHIPS
                .iter()
                .map(|c| yes_no(c.features.l0c_atomic_to_gm).into())
                .collect(),
        ),
        (
            "Sort32 / MrgSort",
            CHIPS
                .iter()
                .map(|c| yes_no(c.features.sort32).into())
                .collect(),
        ),
        (
            "peak fp16 cube (int8: x2)",
            CHIPS
                .iter()
                .map(|c| match (c.cube_peak, c.cube_peak()) {
                    (CubePeak::Public { .. }, Some((t, _))) => format!("{t} TFLOP/s (public)"),
                    (CubePeak::Estimate { .. }, Some((t, _))) => {
                        format!("{t:.0} TFLOP/s (estimate)")
                    }
                    _ => "none".to_string(),
                })
                .collect(),
        ),
        (
            "memory bandwidth (public figure)",
            CHIPS
                .iter()
                .map(|c| match c.public_mem_gbps {
                    Some((g, _)) => format!("{g} GB/s"),
                    None => "none found".to_string(),
                })
                .collect(),
        ),
    ];
    let mut out = String::from("| |");
    for c in &CHIPS {
        out.push_str(&format!(" {} |", c.name));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(CHIPS.len()));
    out.push('\n');
    for (label, cells) in rows.drain(..) {
        out.push_str(&format!("| {label} |"));
        for cell in cells {
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}
