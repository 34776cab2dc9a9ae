//! Migrates a fake 64 MiB VM (a quarter of its pages non-zero) over loopback TCP and prints
//! the report: `cargo run --release -p kiln-migration --example loopback`.

use std::net::{TcpListener, TcpStream};

use kiln_migration::{receive, send, DestVm, HostInfo, Params, Region, SourceVm, PAGE};

struct Src(Vec<u8>);
struct Dst(Vec<u8>);

const LEN: u64 = 64 << 20;

impl SourceVm for Src {
    fn regions(&self) -> Vec<Region> {
        vec![Region { gpa: 0, len: LEN }]
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        let s = gpa as usize;
        buf.copy_from_slice(&self.0[s..s + buf.len()]);
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, String> {
        Ok(vec![vec![0; (LEN / PAGE / 64) as usize]])
    }
    fn stop_dirty_log(&mut self) {}
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) {}
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(vec![0; 64 << 10])
    }
}

impl DestVm for Dst {
    fn prepare(&mut self, hello: &kiln_migration::Hello) -> Result<(), String> {
        let len: u64 = hello.regions.iter().map(|r| r.len).sum();
        self.0 = vec![0; len as usize];
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let s = gpa as usize;
        self.0[s..s + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), String> {
        self.0[gpa as usize..(gpa + len) as usize].fill(0);
        Ok(())
    }
    fn restore_and_run(&mut self, _state: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = HostInfo {
        kiln_version: "example".into(),
        cpu_vendor: *b"GenuineIntel",
        cpu_features: vec![],
    };
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let h2 = host.clone();
    let d = std::thread::spawn(move || -> Result<bool, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let mut dst = Dst(Vec::new());
        receive(&mut dst, &mut s, &h2).map_err(|e| e.to_string())?;
        Ok(dst
            .0
            .iter()
            .step_by(4096)
            .enumerate()
            .all(|(i, &b)| b == (i % 4 == 0) as u8))
    });
    let mut mem = vec![0u8; LEN as usize];
    for p in (0..LEN / PAGE).step_by(4) {
        mem[(p * PAGE) as usize] = 1;
    }
    let mut s = TcpStream::connect(addr)?;
    let report = send(&mut Src(mem), &mut s, &host, &Params::default())?;
    let same = d.join().map_err(|_| "destination panicked")??;
    println!("{report} identical={same}");
    Ok(())
}
