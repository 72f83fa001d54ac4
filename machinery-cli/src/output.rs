//! Writing answers: aligned tables and key/value blocks for people (coloured only on a terminal), JSON for
//! scripts.

use std::io::{self, IsTerminal as _, Write};

/// A colour (or weight) for one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Paint {
    /// Column headers.
    Bold,
    /// Good news: SUCCESS, alive.
    Green,
    /// Bad news: FAILURE, dead.
    Red,
    /// Waiting: PENDING, RETRY, delayed.
    Yellow,
    /// Less important text.
    Dim,
}

impl Paint {
    fn code(self) -> &'static str {
        match self {
            Paint::Bold => "1",
            Paint::Green => "32",
            Paint::Red => "31",
            Paint::Yellow => "33",
            Paint::Dim => "2",
        }
    }
}

/// Whether to colour: only when stdout is a terminal and `NO_COLOR` is not set (<https://no-color.org>).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    color: bool,
}

impl Style {
    /// Decides from the environment.
    pub(crate) fn detect() -> Style {
        Style {
            color: io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    #[cfg(test)]
    fn with_color(color: bool) -> Style {
        Style { color }
    }

    /// `text` in `paint`, if colouring.
    pub(crate) fn paint(self, text: &str, paint: Option<Paint>) -> String {
        match paint {
            Some(paint) if self.color => format!("\x1b[{}m{text}\x1b[0m", paint.code()),
            _ => text.to_owned(),
        }
    }
}

/// One table cell: its text and an optional colour.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    text: String,
    paint: Option<Paint>,
    right: bool,
}

/// The widest a table cell gets: longer text is cut with `…` (the whole value is in `--json`).
pub(crate) const CELL_WIDTH: usize = 80;

impl Cell {
    /// Left-aligned text, [escaped](escape) and cut to [`CELL_WIDTH`] characters: a cell shows what a
    /// message holds, and a message can hold anything.
    pub(crate) fn text(text: impl AsRef<str>) -> Cell {
        Cell {
            text: truncate(&escape(text.as_ref()), CELL_WIDTH),
            paint: None,
            right: false,
        }
    }

    /// A right-aligned count; `None` (the broker cannot tell) shows as `-`.
    pub(crate) fn count(count: Option<u64>) -> Cell {
        Cell {
            text: count.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            paint: None,
            right: true,
        }
    }

    /// The same cell coloured.
    pub(crate) fn paint(mut self, paint: Paint) -> Cell {
        self.paint = Some(paint);
        self
    }
}

/// A table with a header row; columns are as wide as their widest cell.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// An empty table with these column headers.
    pub(crate) fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per header).
    pub(crate) fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, no trailing spaces.
    pub(crate) fn render(&self, style: Style) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.text.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<Cell> = self
            .headers
            .iter()
            .map(|h| Cell::text(*h).paint(Paint::Bold))
            .collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                let pad = widths[i] - cell.text.chars().count();
                let last = i + 1 == columns.min(row.len());
                if i > 0 {
                    line.push_str("  ");
                }
                if cell.right {
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str(&style.paint(&cell.text, cell.paint));
                if !cell.right && !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `text` with every control character (C0, DEL, C1: ESC sequences, BEL, CR, newlines) and every
/// bidirectional override written as a Rust escape (`\u{1b}`, `\n`, ...), so that text from a message
/// cannot move the cursor, recolour, retitle or beep the operator's terminal, or break a table's rows.
pub(crate) fn escape(text: &str) -> String {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Shortens `text` to at most `max` characters, ending with `…` when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Writes `text` to stdout.
pub(crate) fn print(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Writes `value` to stdout as pretty JSON and a newline.
pub(crate) fn print_json(value: &serde_json::Value) -> io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    text.push('\n');
    print(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_counts_are_right_aligned() {
        let mut table = Table::new(&["QUEUE", "PENDING", "NOTE"]);
        table.row(vec![
            Cell::text("a"),
            Cell::count(Some(12)),
            Cell::text("x"),
        ]);
        table.row(vec![
            Cell::text("longer"),
            Cell::count(None),
            Cell::text(""),
        ]);
        assert_eq!(
            table.render(Style::with_color(false)),
            "QUEUE   PENDING  NOTE\na            12  x\nlonger        -\n"
        );
    }

    #[test]
    fn colour_codes_do_not_change_the_alignment() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec![Cell::text("ok").paint(Paint::Green), Cell::text("z")]);
        let text = table.render(Style::with_color(true));
        assert_eq!(
            text,
            "\x1b[1mA\x1b[0m   \x1b[1mB\x1b[0m\n\x1b[32mok\x1b[0m  z\n"
        );
    }

    #[test]
    fn cells_escape_control_characters_and_are_cut() {
        assert_eq!(
            escape("a\u{1b}[31mb\u{7}\r\n\t\u{9b}\u{202e}c ü"),
            "a\\u{1b}[31mb\\u{7}\\r\\n\\t\\u{9b}\\u{202e}c ü"
        );
        let mut table = Table::new(&["A", "B"]);
        table.row(vec![Cell::text("x\ny"), Cell::text("z".repeat(10_000))]);
        let text = table.render(Style::with_color(false));
        assert_eq!(text.lines().count(), 2);
        assert_eq!(
            text.lines().nth(1).unwrap(),
            format!("x\\ny  {}…", "z".repeat(CELL_WIDTH - 1))
        );
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
