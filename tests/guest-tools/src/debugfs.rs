//! Access to freehint.ko's diagnostic files in `/sys/kernel/debug/freehint`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use freehint_protocol::layout::{Bit, Layout, LayoutRange, Pfn, MAX_LAYOUT_RANGES};

use crate::result::json_u64;
use crate::Error;

/// The debugfs directory of the module.
#[derive(Debug, Clone)]
pub struct Freehint {
    dir: PathBuf,
}

impl Freehint {
    /// The module's directory (`FREEHINT_DEBUGFS` overrides the default).
    pub fn open() -> Result<Self, Error> {
        let dir = PathBuf::from(
            std::env::var("FREEHINT_DEBUGFS")
                .unwrap_or_else(|_| "/sys/kernel/debug/freehint".into()),
        );
        if !dir.join("build").exists() {
            return Err(Error::msg(format!(
                "{} not found: is debugfs mounted and freehint.ko loaded?",
                dir.display()
            )));
        }
        Ok(Self { dir })
    }

    fn write(&self, file: &str, data: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).open(self.dir.join(file))?;
        f.write_all(data)
    }

    /// Triggers one bitmap build.
    pub fn build(&self) -> Result<(), Error> {
        self.write("build", b"1\n")
            .map_err(|e| Error::io("write build", e))
    }

    /// Sets a layout table (`None`: back to the kernel's memory map).
    pub fn set_layout(&self, layout: Option<&[LayoutRange]>) -> io::Result<()> {
        let text = match layout {
            None => "iomem\n".to_owned(),
            Some(rs) => rs
                .iter()
                .map(|r| format!("{} {} {}\n", r.first_pfn, r.nr_pages, r.first_bit))
                .collect(),
        };
        self.write("layout", text.as_bytes())
    }

    /// Whether the module walks the per-CPU page lists too.
    pub fn pcp(&self) -> Result<bool, Error> {
        fs::read_to_string(self.dir.join("pcp"))
            .map(|s| s.trim() == "1")
            .map_err(|e| Error::io("read pcp", e))
    }

    /// Turns walking the per-CPU page lists on or off.
    pub fn set_pcp(&self, on: bool) -> Result<(), Error> {
        self.write("pcp", if on { b"1\n" } else { b"0\n" })
            .map_err(|e| Error::io("write pcp", e))
    }

    /// Writes raw text to the `layout` file.
    pub fn write_layout_text(&self, text: &str) -> io::Result<()> {
        self.write("layout", text.as_bytes())
    }

    /// The statistics JSON object of the last build.
    pub fn stats(&self) -> Result<String, Error> {
        fs::read_to_string(self.dir.join("stats"))
            .map(|s| s.trim().to_owned())
            .map_err(|e| Error::io("read stats", e))
    }

    /// A number from the statistics.
    pub fn stat(stats: &str, key: &str) -> Result<u64, Error> {
        json_u64(stats, key).ok_or_else(|| Error::msg(format!("stats lack \"{key}\": {stats}")))
    }

    /// The layout table.
    pub fn layout(&self) -> Result<Layout, Error> {
        let text =
            fs::read_to_string(self.dir.join("layout")).map_err(|e| Error::io("read layout", e))?;
        parse_layout(&text)
    }

    /// Reads the bitmap into `words` (resized to the file's length).
    pub fn read_bitmap(&self, words: &mut Vec<u64>) -> Result<(), Error> {
        let mut bytes = Vec::with_capacity(words.len() * 8);
        File::open(self.dir.join("bitmap"))
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::io("read bitmap", e))?;
        if bytes.len() % 8 != 0 {
            return Err(Error::msg(format!(
                "bitmap has {} bytes, not whole words",
                bytes.len()
            )));
        }
        words.clear();
        words.extend(bytes.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        }));
        Ok(())
    }
}

/// Parses the module's layout text ("first_pfn nr_pages first_bit" lines).
pub fn parse_layout(text: &str) -> Result<Layout, Error> {
    let mut ranges = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let nums: Vec<u64> = line
            .split_whitespace()
            .map(|s| s.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| Error::msg(format!("bad layout line {line:?}")))?;
        let [first_pfn, nr_pages, first_bit] = nums[..] else {
            return Err(Error::msg(format!("bad layout line {line:?}")));
        };
        ranges.push(LayoutRange {
            first_pfn: Pfn(first_pfn),
            nr_pages,
            first_bit: Bit(first_bit),
        });
    }
    if ranges.len() > MAX_LAYOUT_RANGES {
        return Err(Error::msg(format!("layout has {} ranges", ranges.len())));
    }
    Layout::from_ranges(&ranges)
        .map_err(|e| Error::msg(format!("invalid layout from the module: {e}")))
}
