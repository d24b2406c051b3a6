//! JIT'd and xlated dumps of the programs under test, with the thunks and calls they hold.

use std::{collections::BTreeMap, path::Path, process::Command};

use aya::programs::Xdp;
use serde_json::{json, Value};

/// The JIT'd images of a program (one per function: the program and its subprograms)
/// with their kernel addresses, from BPF_OBJ_GET_INFO_BY_FD (this bpftool has no
/// disassembler: "No libbfd support").
fn jited_images(fd: i32) -> Vec<(u64, Vec<u8>)> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // struct bpf_prog_info up to jited_func_lens (128 bytes).
    let mut info = [0u8; 128];
    let call = |info: &mut [u8; 128]| {
        // union bpf_attr.info: bpf_fd u32, info_len u32, info u64.
        let mut attr = [0u8; 16];
        attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: the kernel writes at most info_len bytes into `info`, and into the
        // user buffers whose addresses and sizes `info` names.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        rc == 0
    };
    let u32_at = |b: &[u8; 128], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    if !call(&mut info) {
        return Vec::new();
    }
    let jited_len = u32_at(&info, 16) as usize;
    let nr_ksyms = u32_at(&info, 104) as usize;
    let nr_lens = u32_at(&info, 108) as usize;
    if jited_len == 0 || nr_ksyms == 0 || nr_ksyms != nr_lens {
        return Vec::new();
    }
    let mut insns = vec![0u8; jited_len];
    let mut ksyms = vec![0u64; nr_ksyms];
    let mut lens = vec![0u32; nr_lens];
    let mut info = [0u8; 128];
    info[16..20].copy_from_slice(&(jited_len as u32).to_ne_bytes());
    info[24..32].copy_from_slice(&(insns.as_mut_ptr() as u64).to_ne_bytes());
    info[104..108].copy_from_slice(&(nr_ksyms as u32).to_ne_bytes());
    info[108..112].copy_from_slice(&(nr_lens as u32).to_ne_bytes());
    info[112..120].copy_from_slice(&(ksyms.as_mut_ptr() as u64).to_ne_bytes());
    info[120..128].copy_from_slice(&(lens.as_mut_ptr() as u64).to_ne_bytes());
    if !call(&mut info) {
        return Vec::new();
    }
    let mut images = Vec::new();
    let mut at = 0usize;
    for (addr, len) in ksyms.iter().zip(&lens) {
        let len = *len as usize;
        if at + len > insns.len() {
            break;
        }
        images.push((*addr, insns[at..at + len].to_vec()));
        at += len;
    }
    images
}

/// Kernel symbols by address (root sees the addresses).
pub fn kallsyms() -> BTreeMap<u64, String> {
    std::fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let name = f.nth(1)?;
            (addr != 0).then(|| (addr, name.to_owned()))
        })
        .collect()
}

/// Writes DIR/NAME.jited.txt (x86-64 disassembly by objdump, call and jump targets
/// named from kallsyms) and DIR/NAME.xlated.txt (`bpftool prog dump xlated`), and
/// returns how many return thunks, indirect-branch thunks and calls the image has.
pub fn dump_jited(dir: &Path, name: &str, xdp: &Xdp, syms: &BTreeMap<u64, String>) -> Value {
    use std::os::fd::{AsFd, AsRawFd};
    let _ = std::fs::create_dir_all(dir);
    let id = xdp.info().map(|i| i.id()).unwrap_or(0);
    let fd = xdp.fd().unwrap().as_fd().as_raw_fd();
    let mut text = String::new();
    let (mut ret_thunks, mut indirect_thunks, mut calls, mut bytes) = (0, 0, 0, 0);
    for (i, (addr, image)) in jited_images(fd).iter().enumerate() {
        bytes += image.len();
        let bin = dir.join(format!("{name}.{i}.bin"));
        if std::fs::write(&bin, image).is_err() {
            continue;
        }
        let out = Command::new("objdump")
            .args([
                "-D",
                "-b",
                "binary",
                "-m",
                "i386:x86-64",
                "--no-show-raw-insn",
            ])
            .arg(format!("--adjust-vma={addr:#x}"))
            .arg(&bin)
            .output();
        let _ = std::fs::remove_file(&bin);
        let Ok(out) = out else { continue };
        text.push_str(&format!(
            "; function {i} at {addr:#x}, {} bytes\n",
            image.len()
        ));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut line = line.to_owned();
            let target = line
                .rsplit(' ')
                .next()
                .and_then(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok());
            let is_branch = line.contains("call") || line.contains("jmp");
            if let (true, Some(t)) = (is_branch, target) {
                if let Some((base, sym)) = syms.range(..=t).next_back() {
                    if t - base < 0x1000 && !sym.starts_with("bpf_prog_") {
                        line.push_str(&format!("  <{sym}+{:#x}>", t - base));
                        if sym.contains("return_thunk") || sym.contains("safe_ret") {
                            ret_thunks += 1;
                        } else if sym.contains("indirect_thunk") {
                            indirect_thunks += 1;
                        } else if line.contains("call") {
                            calls += 1;
                        }
                    }
                }
            }
            if line.contains("call") && target.is_some_and(|t| t >= 0xffff_ffff_a000_0000) {
                calls += 1; // BPF-to-BPF calls (JIT'd code is above the kernel text)
            }
            text.push_str(&line);
            text.push('\n');
        }
    }
    let _ = std::fs::write(dir.join(format!("{name}.jited.txt")), text);
    if let Ok(o) = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
    {
        let _ = std::fs::write(dir.join(format!("{name}.xlated.txt")), &o.stdout);
    }
    json!({"jited_bytes": bytes, "return_thunks": ret_thunks,
           "indirect_branch_thunks": indirect_thunks, "calls": calls})
}
