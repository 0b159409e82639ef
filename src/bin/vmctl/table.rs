//! The `vmctl status` table and the size format it uses, after OpenBSD's vmctl(8).
//!
//! ```text
//!    ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME
//!     1  4242     2    512M       -       -         root  running web
//! ```
//!
//! Every column but NAME is right-aligned to at least vmctl(8)'s width, wider when a value needs
//! it; NAME comes last and is not padded. A value the daemon did not give is shown as `-`.
//! When a VM that is down has a reason (it failed, or vmd stopped it), a REASON column follows
//! NAME, which is then padded.

/// One VM's line in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusRow {
    /// The daemon's `ID` (or, from an older daemon, the position in name order).
    pub id: u32,
    /// The helper's pid (`LeaderPID`); `None` or 0 when the VM is not running.
    pub pid: Option<u32>,
    /// `VCPUs`.
    pub vcpus: Option<u32>,
    /// `MemoryBytes`.
    pub max_mem: Option<u64>,
    /// Current memory use; not reported by the daemon yet.
    pub cur_mem: Option<u64>,
    /// The console's terminal; not reported by the daemon yet.
    pub tty: Option<String>,
    /// Who owns the VM.
    pub owner: String,
    /// `State`, as the daemon spells it.
    pub state: String,
    /// The VM's name.
    pub name: String,
    /// Why the VM is down, when it failed or vmd stopped it.
    pub reason: Option<String>,
}

const HEADERS: [&str; 9] = [
    "ID", "PID", "VCPUS", "MAXMEM", "CURMEM", "TTY", "OWNER", "STATE", "NAME",
];
/// vmctl(8)'s column widths; the last column (NAME) is never padded.
const MIN_WIDTHS: [usize; 9] = [5, 5, 5, 7, 7, 7, 12, 8, 0];

/// Renders the header and one line per row, each line ending in `\n`.
pub fn render(rows: &[StatusRow]) -> String {
    let cells: Vec<[String; 9]> = rows.iter().map(cells).collect();
    let mut widths = MIN_WIDTHS;
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let with_reasons = rows.iter().any(|row| row.reason.is_some());
    let name_width = if with_reasons {
        cells
            .iter()
            .map(|line| line[8].chars().count())
            .chain(std::iter::once(HEADERS[8].len()))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let reasons = std::iter::once("REASON")
        .chain(rows.iter().map(|row| row.reason.as_deref().unwrap_or("-")));
    let lines = std::iter::once(HEADERS.map(str::to_owned)).chain(cells);
    for (line, reason) in lines.zip(reasons) {
        push_line(&mut out, &line, &widths);
        if with_reasons {
            out.pop();
            let pad = name_width - line[8].chars().count();
            out.push_str(&format!("{:pad$} {reason}\n", ""));
        }
    }
    out
}

fn push_line(out: &mut String, cells: &[String; 9], widths: &[usize; 9]) {
    let [aligned @ .., name] = cells;
    for (cell, &width) in aligned.iter().zip(widths) {
        out.push_str(&format!("{cell:>width$} "));
    }
    out.push_str(name);
    out.push('\n');
}

fn cells(row: &StatusRow) -> [String; 9] {
    let dash = || "-".to_owned();
    [
        row.id.to_string(),
        row.pid
            .filter(|&pid| pid != 0)
            .map_or_else(dash, |pid| pid.to_string()),
        row.vcpus.map_or_else(dash, |n| n.to_string()),
        row.max_mem
            .filter(|&bytes| bytes != 0)
            .map_or_else(dash, format_size),
        row.cur_mem
            .filter(|&bytes| bytes != 0)
            .map_or_else(dash, format_size),
        row.tty.clone().unwrap_or_else(dash),
        row.owner.clone(),
        row.state.clone(),
        row.name.clone(),
    ]
}

const UNITS: [char; 7] = ['B', 'K', 'M', 'G', 'T', 'P', 'E'];

/// Formats a byte count in binary units as OpenBSD's fmt_scaled(3) does: the largest unit that
/// keeps the number at 1 or more; one decimal below 100 of that unit, a whole number from 100 up;
/// bytes are always whole. `512M`, `1.0G`, `1.5G`, `64.0M`, `100M`, `900B`.
pub fn format_size(bytes: u64) -> String {
    let mut exponent = 0;
    while exponent + 1 < UNITS.len() && bytes >> (10 * (exponent + 1)) != 0 {
        exponent += 1;
    }
    if exponent == 0 {
        return format!("{bytes}B");
    }
    let unit = 1u128 << (10 * exponent);
    let bytes = u128::from(bytes);
    let tenths = (bytes * 10 + unit / 2) / unit;
    if tenths < 1000 {
        return format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[exponent]);
    }
    let whole = (bytes + unit / 2) / unit;
    if whole >= 1024 && exponent + 1 < UNITS.len() {
        // Rounded up to the next unit (e.g. 1023.9K): say "1.0M" rather than "1024K".
        return format!("1.0{}", UNITS[exponent + 1]);
    }
    format!("{whole}{}", UNITS[exponent])
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes_like_fmt_scaled() {
        for (bytes, text) in [
            (0, "0B"),
            (900, "900B"),
            (1023, "1023B"),
            (KIB, "1.0K"),
            (1536, "1.5K"),
            (64 * MIB, "64.0M"),
            (99 * MIB, "99.0M"),
            (100 * MIB, "100M"),
            (256 * MIB, "256M"),
            (512 * MIB, "512M"),
            (GIB, "1.0G"),
            (3 * GIB / 2, "1.5G"),
            (16 * GIB, "16.0G"),
            (2 << 40, "2.0T"),
            (u64::MAX, "16.0E"),
        ] {
            assert_eq!(format_size(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn sizes_round_to_nearest() {
        // 59.94M rounds to 59.9M, 59.96M to 60.0M.
        assert_eq!(format_size(59 * MIB + 94 * MIB / 100), "59.9M");
        assert_eq!(format_size(59 * MIB + 96 * MIB / 100), "60.0M");
        // 99.96M rounds to a whole 100M; 1023.9K rounds up into the next unit.
        assert_eq!(format_size(99 * MIB + 96 * MIB / 100), "100M");
        assert_eq!(format_size(1023 * KIB + 900), "1.0M");
        assert_eq!(format_size(1000 * KIB + 400), "1000K");
    }

    fn row(id: u32, name: &str) -> StatusRow {
        StatusRow {
            id,
            owner: "root".into(),
            state: "stopped".into(),
            name: name.into(),
            ..StatusRow::default()
        }
    }

    #[test]
    fn empty_table_is_the_header() {
        assert_eq!(
            render(&[]),
            "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME\n"
        );
    }

    #[test]
    fn rows_right_align_under_the_header() {
        let running = StatusRow {
            pid: Some(4242),
            vcpus: Some(2),
            max_mem: Some(512 * MIB),
            state: "running".into(),
            ..row(1, "web")
        };
        let stopped = StatusRow {
            pid: Some(0),
            vcpus: Some(1),
            max_mem: Some(GIB),
            ..row(2, "db.prod")
        };
        assert_eq!(
            render(&[running, stopped]),
            concat!(
                "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME\n",
                "    1  4242     2    512M       -       -         root  running web\n",
                "    2     -     1    1.0G       -       -         root  stopped db.prod\n",
            )
        );
    }

    #[test]
    fn missing_values_are_dashes() {
        assert_eq!(
            render(&[row(7, "x")]).lines().nth(1),
            Some("    7     -     -       -       -       -         root  stopped x")
        );
    }

    #[test]
    fn reasons_follow_the_names() {
        let failed = StatusRow {
            state: "failed".into(),
            reason: Some("cannot load the kernel".into()),
            ..row(2, "db.prod")
        };
        assert_eq!(
            render(&[row(1, "web"), failed]),
            concat!(
                "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME    REASON\n",
                "    1     -     -       -       -       -         root  stopped web     -\n",
                "    2     -     -       -       -       -         root   failed db.prod cannot load the kernel\n",
            )
        );
    }

    #[test]
    fn wide_values_widen_their_column() {
        let wide = StatusRow {
            pid: Some(4_194_304),
            owner: "a-very-long-owner".into(),
            ..row(1, "w")
        };
        let text = render(&[wide, row(2, "n")]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "   ID     PID VCPUS  MAXMEM  CURMEM     TTY             OWNER    STATE NAME",
                "    1 4194304     -       -       -       - a-very-long-owner  stopped w",
                "    2       -     -       -       -       -              root  stopped n",
            ]
        );
    }
}
