//! Just enough ELF64 (little-endian) reading for kernels and modules.
//!
//! Module files and kernels are treated as untrusted input: every offset is
//! bounds-checked with checked arithmetic and every loop is bounded by the
//! header counts (at most 65535), so malformed files give an error, never a
//! panic or a huge allocation.

/// Why a file could not be read as ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ElfError(pub &'static str);

impl std::fmt::Display for ElfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU boots.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 0x12;

/// A parsed ELF64 little-endian header over borrowed bytes.
pub(crate) struct Elf<'a> {
    data: &'a [u8],
    phoff: usize,
    phentsize: usize,
    phnum: usize,
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

fn u16_at(d: &[u8], o: usize) -> Option<u16> {
    let b = d.get(o..o.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    let b = d.get(o..o.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(d: &[u8], o: usize) -> Option<u64> {
    let b = d.get(o..o.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

fn usize_at(d: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u64_at(d, o)?).ok()
}

/// Whether `data` starts with the ELF magic.
pub(crate) fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

impl<'a> Elf<'a> {
    /// Parses the file header.
    pub(crate) fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if !is_elf(data) {
            return Err(ElfError("no ELF magic"));
        }
        if data.len() < 64 {
            return Err(ElfError("truncated ELF header"));
        }
        if data[4] != 2 || data[5] != 1 {
            return Err(ElfError("not a little-endian 64-bit ELF file"));
        }
        let bad = || ElfError("truncated ELF header");
        Ok(Self {
            data,
            phoff: usize_at(data, 0x20).ok_or_else(bad)?,
            shoff: usize_at(data, 0x28).ok_or_else(bad)?,
            phentsize: u16_at(data, 0x36).ok_or_else(bad)? as usize,
            phnum: u16_at(data, 0x38).ok_or_else(bad)? as usize,
            shentsize: u16_at(data, 0x3A).ok_or_else(bad)? as usize,
            shnum: u16_at(data, 0x3C).ok_or_else(bad)? as usize,
            shstrndx: u16_at(data, 0x3E).ok_or_else(bad)? as usize,
        })
    }

    /// `(type, offset, file size)` of every program header that fits the file.
    fn program_headers(&self) -> impl Iterator<Item = (u32, usize, usize)> + '_ {
        let ok = self.phentsize >= 0x38;
        (0..if ok { self.phnum } else { 0 }).filter_map(move |i| {
            let base = self.phoff.checked_add(i.checked_mul(self.phentsize)?)?;
            Some((
                u32_at(self.data, base)?,
                usize_at(self.data, base.checked_add(0x08)?)?,
                usize_at(self.data, base.checked_add(0x20)?)?,
            ))
        })
    }

    /// `(name offset, type, offset, size)` of every section header that fits the file.
    fn section_headers(&self) -> impl Iterator<Item = (u32, u32, usize, usize)> + '_ {
        let ok = self.shentsize >= 0x40;
        (0..if ok { self.shnum } else { 0 }).filter_map(move |i| {
            let base = self.shoff.checked_add(i.checked_mul(self.shentsize)?)?;
            Some((
                u32_at(self.data, base)?,
                u32_at(self.data, base.checked_add(0x04)?)?,
                usize_at(self.data, base.checked_add(0x18)?)?,
                usize_at(self.data, base.checked_add(0x20)?)?,
            ))
        })
    }

    fn slice(&self, offset: usize, size: usize) -> Option<&'a [u8]> {
        self.data.get(offset..offset.checked_add(size)?)
    }

    /// Whether the file asks for a dynamic loader (`PT_INTERP`).
    pub(crate) fn has_interpreter(&self) -> bool {
        self.program_headers().any(|(t, _, _)| t == PT_INTERP)
    }

    /// The contents of the section called `name`.
    pub(crate) fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let (_, _, str_off, str_size) = self
            .section_headers()
            .nth(self.shstrndx)
            .ok_or(ElfError("section name table missing"))?;
        let names = self
            .slice(str_off, str_size)
            .ok_or(ElfError("section name table outside the file"))?;
        for (name_off, _, off, size) in self.section_headers() {
            let Some(rest) = names.get(name_off as usize..) else {
                continue;
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return self
                    .slice(off, size)
                    .map(Some)
                    .ok_or(ElfError("section outside the file"));
            }
        }
        Ok(None)
    }

    /// Every note `(name, type, descriptor)` in `PT_NOTE` segments, or in
    /// `SHT_NOTE` sections if there are no note segments.
    pub(crate) fn notes(&self) -> Vec<(&'a [u8], u32, &'a [u8])> {
        let mut areas: Vec<&[u8]> = self
            .program_headers()
            .filter(|&(t, _, _)| t == PT_NOTE)
            .filter_map(|(_, off, size)| self.slice(off, size))
            .collect();
        if areas.is_empty() {
            areas = self
                .section_headers()
                .filter(|&(_, t, _, _)| t == SHT_NOTE)
                .filter_map(|(_, _, off, size)| self.slice(off, size))
                .collect();
        }
        let mut notes = Vec::new();
        for area in areas {
            let mut pos = 0usize;
            // Each note takes at least 12 bytes, which bounds the loop.
            while let (Some(namesz), Some(descsz), Some(ntype)) = (
                u32_at(area, pos),
                u32_at(area, pos + 4),
                u32_at(area, pos + 8),
            ) {
                let name_start = pos + 12;
                let Some(name_end) = name_start.checked_add(namesz as usize) else {
                    break;
                };
                let Some(desc_start) = name_start.checked_add(align4(namesz as usize)) else {
                    break;
                };
                let Some(desc_end) = desc_start.checked_add(descsz as usize) else {
                    break;
                };
                let (Some(name), Some(desc)) = (
                    area.get(name_start..name_end),
                    area.get(desc_start..desc_end),
                ) else {
                    break;
                };
                let name = name.strip_suffix(&[0]).unwrap_or(name);
                notes.push((name, ntype, desc));
                let Some(next) = desc_start.checked_add(align4(descsz as usize)) else {
                    break;
                };
                pos = next;
            }
        }
        notes
    }

    /// Whether the kernel has the Xen PVH entry note QEMU needs to boot an ELF `-kernel`.
    pub(crate) fn has_pvh_note(&self) -> bool {
        self.notes()
            .iter()
            .any(|&(name, t, _)| name == b"Xen" && t == XEN_ELFNOTE_PHYS32_ENTRY)
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Test helpers that assemble small ELF files.
#[cfg(test)]
pub(crate) mod build {
    /// An ELF64 LE file with the given sections (name, type, contents) and,
    /// optionally, one PT_NOTE segment covering the section called `.notes`.
    pub(crate) fn elf_with_sections(
        sections: &[(&str, u32, &[u8])],
        note_segment: bool,
    ) -> Vec<u8> {
        let mut shstrtab = vec![0u8];
        let mut name_offs = Vec::new();
        for (name, _, _) in sections {
            name_offs.push(shstrtab.len() as u32);
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        let shstr_name = shstrtab.len() as u32;
        shstrtab.extend_from_slice(b".shstrtab\0");

        let mut out = vec![0u8; 64];
        let ph_off = out.len();
        if note_segment {
            out.extend_from_slice(&[0u8; 0x38]);
        }
        let mut placed = Vec::new();
        for (_, _, data) in sections {
            placed.push((out.len(), data.len()));
            out.extend_from_slice(data);
        }
        let shstr_off = out.len();
        out.extend_from_slice(&shstrtab);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        let sh_off = out.len();
        out.extend_from_slice(&[0u8; 0x40]); // null section
        for (i, (_, t, _)) in sections.iter().enumerate() {
            out.extend_from_slice(&sh(name_offs[i], *t, placed[i].0, placed[i].1));
        }
        out.extend_from_slice(&sh(shstr_name, 3, shstr_off, shstrtab.len()));

        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[0x28..0x30].copy_from_slice(&(sh_off as u64).to_le_bytes());
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        out[0x3A..0x3C].copy_from_slice(&0x40u16.to_le_bytes());
        let shnum = sections.len() as u16 + 2;
        out[0x3C..0x3E].copy_from_slice(&shnum.to_le_bytes());
        out[0x3E..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        if note_segment {
            let idx = sections
                .iter()
                .position(|(n, _, _)| *n == ".notes")
                .expect(".notes section");
            out[0x20..0x28].copy_from_slice(&(ph_off as u64).to_le_bytes());
            out[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
            out[0x38..0x3A].copy_from_slice(&1u16.to_le_bytes());
            let p = &mut out[ph_off..ph_off + 0x38];
            p[0..4].copy_from_slice(&4u32.to_le_bytes());
            p[8..16].copy_from_slice(&(placed[idx].0 as u64).to_le_bytes());
            p[0x20..0x28].copy_from_slice(&(placed[idx].1 as u64).to_le_bytes());
        }
        out
    }

    fn sh(name: u32, t: u32, off: usize, size: usize) -> [u8; 0x40] {
        let mut s = [0u8; 0x40];
        s[0..4].copy_from_slice(&name.to_le_bytes());
        s[4..8].copy_from_slice(&t.to_le_bytes());
        s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
        s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
        s
    }

    /// One ELF note.
    pub(crate) fn note(name: &[u8], t: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&t.to_le_bytes());
        n.extend_from_slice(name);
        n.push(0);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n.extend_from_slice(desc);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n
    }

    /// A kernel-like ELF with (or without) the PVH note.
    pub(crate) fn fake_vmlinux(pvh: bool) -> Vec<u8> {
        let mut notes = note(b"GNU", 3, b"build-id");
        if pvh {
            notes.extend(note(
                b"Xen",
                super::XEN_ELFNOTE_PHYS32_ENTRY,
                &0x100_0000u32.to_le_bytes(),
            ));
        }
        let text = b"Linux version 6.6.6-test (x@y) #1 SMP".repeat(50);
        elf_with_sections(&[(".text", 1, &text), (".notes", 7, &notes)], true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sections_and_notes() {
        let elf = build::fake_vmlinux(true);
        let e = Elf::parse(&elf).unwrap();
        assert!(e.has_pvh_note());
        assert!(!e.has_interpreter());
        assert!(e
            .section(".text")
            .unwrap()
            .unwrap()
            .starts_with(b"Linux version"));
        assert_eq!(e.section(".nope").unwrap(), None);
        let elf = build::fake_vmlinux(false);
        assert!(!Elf::parse(&elf).unwrap().has_pvh_note());
    }

    #[test]
    fn notes_from_sections_without_segments() {
        let notes = build::note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2, 3, 4]);
        let elf = build::elf_with_sections(&[(".notes", 7, &notes)], false);
        assert!(Elf::parse(&elf).unwrap().has_pvh_note());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = build::fake_vmlinux(true);
        assert!(Elf::parse(b"").is_err());
        assert!(Elf::parse(b"\x7fELF").is_err());
        // Truncations and byte flips anywhere must never panic.
        for cut in (0..good.len()).step_by(7) {
            if let Ok(e) = Elf::parse(&good[..cut]) {
                let _ = e.section(".text");
                let _ = e.has_pvh_note();
            }
        }
        for i in 0..good.len() {
            for v in [0x00, 0xff, 0x7f] {
                let mut bad = good.clone();
                bad[i] = v;
                if let Ok(e) = Elf::parse(&bad) {
                    let _ = e.section(".text");
                    let _ = e.notes();
                    let _ = e.has_interpreter();
                }
            }
        }
    }
}
