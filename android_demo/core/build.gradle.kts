// Plain Java (no android.*): pre/post-processing, tiling, precision tables, latency statistics, benchmark parsing.
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_1_8
    targetCompatibility = JavaVersion.VERSION_1_8
}

dependencies {
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    // the golden files and tests/data samples are read relative to the repository root
    systemProperty("quantface.repo", rootProject.projectDir.parentFile.absolutePath)
}
