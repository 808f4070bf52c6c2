//! `--device auto|cpu|cuda|cuda:N`.

use candle_core::Device;

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
}
