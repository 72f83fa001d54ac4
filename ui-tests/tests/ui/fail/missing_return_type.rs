use machinery::task;

#[task]
async fn log(line: String) {
    let _ = line;
}

fn main() {}
