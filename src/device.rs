//! `--device auto|cpu|cuda|cuda:N` and `--dtype f32|f16|bf16`.

use candle_core::{DType, Device};

/// Picks the device named by `spec`. `auto` takes the first GPU when this build has
/// CUDA support and one is present, else the CPU.
pub fn select(spec: &str) -> anyhow::Result<Device> {
    match spec.trim() {
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("--device {s}: expected cuda:N with N a GPU index")
                })?,
            };
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "--device {s}: this binary was built without CUDA support; rebuild with `--features cuda`"
                );
            }
            Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device {s}: {e}"))
        }
        other => anyhow::bail!("--device {other:?}: expected auto, cpu, cuda or cuda:N"),
    }
}

/// The inference dtype named by `spec` (`--dtype`, env `FUSION_DTYPE`) for a model on
/// `device`. Half precision (f16, bf16) is for GPUs only: candle's CPU kernels for
/// them are slow and partly missing, so it is refused on the CPU, naming the flag.
pub fn select_dtype(spec: &str, device: &Device) -> anyhow::Result<DType> {
    let dtype = match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => anyhow::bail!("--dtype {spec:?}: expected f32, f16 or bf16"),
    };
    if dtype != DType::F32 && device.is_cpu() {
        anyhow::bail!(
            "--dtype {}: half precision runs on a GPU only (--device cuda, in a build with \
             `--features cuda`); on the CPU use --dtype f32",
            dtype.as_str()
        );
    }
    Ok(dtype)
}

/// A short name for logs and GetModelInfo.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_work_everywhere() {
        assert!(select("cpu").unwrap().is_cpu());
        select("auto").unwrap();
    }

    #[test]
    fn bad_specs_are_refused_with_the_flag_named() {
        let e = select("tpu").unwrap_err().to_string();
        assert!(e.contains("--device"), "{e}");
        let e = select("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn dtypes_parse_and_half_precision_is_refused_on_the_cpu() {
        assert_eq!(select_dtype("f32", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(select_dtype(" F32 ", &Device::Cpu).unwrap(), DType::F32);
        for spec in ["f16", "bf16", "bfloat16"] {
            let e = select_dtype(spec, &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains("--dtype") && e.contains("GPU"), "{e}");
        }
        let e = select_dtype("f64", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("--dtype") && e.contains("bf16"), "{e}");
    }
}
